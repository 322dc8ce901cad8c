//! What qbproxy says about itself: Prometheus metrics and log setup.

pub mod logging;
pub(crate) mod metrics;
