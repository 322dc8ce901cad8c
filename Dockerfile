# Build in the official Rust image, run in a small Debian image as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
# The workspace: qbproxy (the library and the binary) and qbproxy-sim (the
# simulator, for `qbproxy demo` and `qbproxy sim`).
COPY Cargo.toml Cargo.lock ./
COPY sim/Cargo.toml ./sim/
# The dependencies first, in a layer of their own, built against empty
# sources: a change to src/ rebuilds qbproxy alone. qbproxy's own build
# records are removed so the real sources are compiled whatever their dates.
RUN mkdir -p src/bin/qbproxy bench sim/src \
 && echo 'fn main() {}' > src/bin/qbproxy/main.rs && touch src/lib.rs sim/src/lib.rs \
 && for e in fast_upstream loadgen floor reload; do echo 'fn main() {}' > bench/$e.rs; done \
 && cargo build --release --locked -p qbproxy \
 && rm -rf src sim/src target/release/qbproxy* target/release/deps/qbproxy* \
           target/release/deps/libqbproxy* target/release/.fingerprint/qbproxy*
COPY src ./src
COPY sim/src ./sim/src
RUN cargo build --release --locked -p qbproxy && strip target/release/qbproxy

FROM debian:bookworm-slim
# ca-certificates: the upstream's TLS roots. curl: the HEALTHCHECK.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin qbproxy
COPY --from=build /src/target/release/qbproxy /usr/local/bin/qbproxy
USER qbproxy
# Proxy and admin ports; the mounted config must listen on 0.0.0.0.
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9090/healthz || exit 1
# Mount the config here; secrets come from the environment or /run/secrets.
ENTRYPOINT ["/usr/local/bin/qbproxy", "--config", "/etc/qbproxy/config.toml"]
