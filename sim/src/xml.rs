//! One XML element read whole (a WebSocket message of XMPP, RFC 7395
//! §3.3.3: each message is one complete element), with quick-xml, and
//! written back.
//!
//! qbproxy's `chat/xml.rs` reads elements the same way, with its own copy:
//! the simulator shares no code with the proxy it stands in front of
//! (Cargo.toml), so a bug in qbproxy's reading cannot be mirrored here.

use quick_xml::escape::{escape, resolve_predefined_entity};
use quick_xml::events::Event;
use quick_xml::Reader;

/// An element: its qualified name, attributes in order, children and text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    pub fn new(name: &str) -> Element {
        Element {
            name: name.to_owned(),
            ..Element::default()
        }
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn with(mut self, name: &str, value: &str) -> Element {
        self.set(name, value);
        self
    }

    pub fn set(&mut self, name: &str, value: &str) {
        match self.attrs.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v = value.to_owned(),
            None => self.attrs.push((name.to_owned(), value.to_owned())),
        }
    }

    pub fn child(mut self, child: Element) -> Element {
        self.children.push(child);
        self
    }

    pub fn text(mut self, text: &str) -> Element {
        self.text = text.to_owned();
        self
    }

    /// The first child named `name` (local name, any prefix).
    pub fn find(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.local() == name)
    }

    pub fn local(&self) -> &str {
        self.name.rsplit(':').next().unwrap_or(&self.name)
    }

    /// The element's namespace as declared on it (`xmlns`).
    pub fn ns(&self) -> Option<&str> {
        self.attr("xmlns")
    }

    /// Reads one element; `None` if `text` is not exactly one
    /// well-formed element (whitespace around it aside).
    pub fn parse(text: &str) -> Option<Element> {
        let mut reader = Reader::from_str(text);
        let mut stack: Vec<Element> = Vec::new();
        let mut root = None;
        loop {
            match reader.read_event().ok()? {
                Event::Start(e) => {
                    if root.is_some() {
                        return None;
                    }
                    stack.push(start(&e)?);
                }
                Event::Empty(e) => {
                    if root.is_some() {
                        return None;
                    }
                    let el = start(&e)?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(el),
                        None => root = Some(el),
                    }
                }
                Event::End(_) => {
                    let el = stack.pop()?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(el),
                        None => root = Some(el),
                    }
                }
                Event::Text(t) => {
                    let t = t.xml_content().ok()?;
                    match stack.last_mut() {
                        Some(el) => el.text.push_str(&t),
                        None if t.trim().is_empty() => {}
                        None => return None,
                    }
                }
                Event::CData(t) => stack.last_mut()?.text.push_str(&t.decode().ok()?),
                Event::GeneralRef(r) => {
                    let c = match r.resolve_char_ref().ok()? {
                        Some(c) => c.to_string(),
                        None => resolve_predefined_entity(&r.decode().ok()?)?.to_owned(),
                    };
                    stack.last_mut()?.text.push_str(&c);
                }
                Event::Decl(_) => {}
                Event::Eof => break,
                // XMPP allows no comments, PIs or DTDs (RFC 6120 §11.1).
                _ => return None,
            }
        }
        if !stack.is_empty() {
            return None;
        }
        root
    }

    pub fn write(&self, out: &mut String) {
        out.push('<');
        out.push_str(&self.name);
        for (k, v) in &self.attrs {
            out.push(' ');
            out.push_str(k);
            out.push_str("=\"");
            out.push_str(&escape(v.as_str()));
            out.push('"');
        }
        if self.children.is_empty() && self.text.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        out.push_str(&escape(self.text.as_str()));
        for c in &self.children {
            c.write(out);
        }
        out.push_str("</");
        out.push_str(&self.name);
        out.push('>');
    }
}

impl std::fmt::Display for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        self.write(&mut s);
        f.write_str(&s)
    }
}

fn start(e: &quick_xml::events::BytesStart<'_>) -> Option<Element> {
    let mut el = Element::new(std::str::from_utf8(e.name().as_ref()).ok()?);
    for a in e.attributes() {
        let a = a.ok()?;
        let k = std::str::from_utf8(a.key.as_ref()).ok()?.to_owned();
        let v = a.unescape_value().ok()?.into_owned();
        el.attrs.push((k, v));
    }
    Some(el)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_element_is_read_and_written_back() {
        let text = r#"<message to="1002-76730@chat.example" type="chat" id="m1"><body>a &amp; b &lt;3 &#x263A;</body><extraParams xmlns="jabber:client"><save_to_history>1</save_to_history></extraParams></message>"#;
        let el = Element::parse(text).unwrap();
        assert_eq!(el.local(), "message");
        assert_eq!(el.attr("to"), Some("1002-76730@chat.example"));
        assert_eq!(el.find("body").unwrap().text, "a & b <3 \u{263A}");
        let again = Element::parse(&el.to_string()).unwrap();
        assert_eq!(again, el);
        for bad in ["<a>", "<a/><b/>", "text", "<a><!-- no --></a>", ""] {
            assert_eq!(Element::parse(bad), None, "{bad}");
        }
    }
}
