//! XMPP over TCP is one XML document per direction: a `<stream:stream>`
//! start tag, then stanzas, then `</stream:stream>`. [`Splitter`] reads
//! that byte stream as it arrives and hands out its parts whole: the
//! stream header, each top-level element (what XMPP over WebSocket sends
//! one per message, RFC 7395), and the stream's end. It tracks only what
//! it must to find element boundaries (tags, quoted attribute values,
//! CDATA); the elements pass on as they were written. An element longer
//! than its bound, and what XMPP forbids (comments, processing
//! instructions, DTDs: RFC 6120 §11.1), end the stream.

/// A part of the stream.
#[derive(Debug, PartialEq)]
pub(crate) enum Part {
    /// The stream's start tag (`<stream:stream …>`), with any XML
    /// declaration before it dropped.
    Header(String),
    /// A top-level element, whole.
    Element(String),
    /// `</stream:stream>`.
    End,
}

/// Why the stream cannot be read on.
#[derive(Debug, PartialEq, thiserror::Error)]
pub(crate) enum SplitError {
    #[error("an element is over chat.max_stanza_bytes ({0} bytes)")]
    TooLarge(usize),
    #[error(
        "not well-formed XML, or what XMPP forbids (a comment, a DTD, a processing instruction)"
    )]
    NotWellFormed,
}

#[derive(Debug, Default, PartialEq, Clone, Copy)]
enum State {
    /// Between tags.
    #[default]
    Text,
    /// Just after `<`.
    Open,
    /// In a start or end tag; outside quotes unless `quote` is set.
    Tag,
    /// In `<?…?>` (the XML declaration, before the stream only).
    Decl,
    /// In `<![CDATA[…]]>`, `matched` of `]]>` seen.
    Cdata,
    /// In `<!` before knowing whether it is CDATA.
    Bang,
}

pub(crate) struct Splitter {
    max: usize,
    state: State,
    /// The part being read (from its `<`), bounded by `max`.
    buf: Vec<u8>,
    /// Element depth: 0 before the stream header, 1 inside the stream.
    depth: usize,
    quote: Option<u8>,
    /// The tag being read is an end tag (`</…>`).
    closing: bool,
    /// The byte before this one in a tag (to see `/>`).
    prev: u8,
    /// Progress through `]]>` or `[CDATA[`.
    matched: usize,
    started: bool,
}

const CDATA_OPEN: &[u8] = b"[CDATA[";

impl Splitter {
    pub fn new(max: usize) -> Splitter {
        Splitter {
            max,
            state: State::Text,
            buf: Vec::new(),
            depth: 0,
            quote: None,
            closing: false,
            prev: 0,
            matched: 0,
            started: false,
        }
    }

    /// Reads `data`, appending every part it completes to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Part>) -> Result<(), SplitError> {
        for &b in data {
            self.byte(b, out)?;
        }
        Ok(())
    }

    fn push(&mut self, b: u8) -> Result<(), SplitError> {
        if self.buf.len() >= self.max {
            return Err(SplitError::TooLarge(self.max));
        }
        self.buf.push(b);
        Ok(())
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Part>) -> Result<(), SplitError> {
        match self.state {
            State::Text => {
                if b == b'<' {
                    if self.depth <= 1 {
                        // A new part starts here (whitespace between
                        // stanzas, keepalives, is dropped).
                        self.buf.clear();
                    }
                    self.push(b)?;
                    self.state = State::Open;
                } else if self.depth >= 2 {
                    self.push(b)?;
                } else if !b.is_ascii_whitespace() {
                    // Text at the top level of the stream.
                    return Err(SplitError::NotWellFormed);
                }
            }
            State::Open => {
                self.push(b)?;
                match b {
                    b'/' => {
                        self.closing = true;
                        self.state = State::Tag;
                    }
                    b'?' if !self.started => self.state = State::Decl,
                    b'!' if self.depth >= 2 => {
                        self.matched = 0;
                        self.state = State::Bang;
                    }
                    b'?' | b'!' => return Err(SplitError::NotWellFormed),
                    _ => {
                        self.closing = false;
                        self.state = State::Tag;
                    }
                }
                self.prev = b;
            }
            State::Bang => {
                self.push(b)?;
                if b != CDATA_OPEN[self.matched] {
                    return Err(SplitError::NotWellFormed);
                }
                self.matched += 1;
                if self.matched == CDATA_OPEN.len() {
                    self.matched = 0;
                    self.state = State::Cdata;
                }
            }
            State::Cdata => {
                self.push(b)?;
                self.matched = match (self.matched, b) {
                    (0 | 1, b']') => self.matched + 1,
                    (2, b']') => 2,
                    (2, b'>') => {
                        self.state = State::Text;
                        0
                    }
                    _ => 0,
                };
            }
            State::Decl => {
                // The XML declaration before the stream is dropped.
                if self.prev == b'?' && b == b'>' {
                    self.buf.clear();
                    self.state = State::Text;
                }
                self.prev = b;
            }
            State::Tag => {
                self.push(b)?;
                match (self.quote, b) {
                    (Some(q), _) if b == q => self.quote = None,
                    (Some(_), _) => {}
                    (None, b'"' | b'\'') => self.quote = Some(b),
                    (None, b'>') => {
                        self.state = State::Text;
                        let empty = self.prev == b'/' && !self.closing;
                        self.tag_done(empty, out)?;
                    }
                    (None, b'<') => return Err(SplitError::NotWellFormed),
                    _ => {}
                }
                self.prev = b;
            }
        }
        Ok(())
    }

    /// A tag ended: depth changes, and maybe a part is complete.
    fn tag_done(&mut self, empty: bool, out: &mut Vec<Part>) -> Result<(), SplitError> {
        if self.closing {
            if self.depth == 0 {
                return Err(SplitError::NotWellFormed);
            }
            self.depth -= 1;
            match self.depth {
                0 => {
                    self.buf.clear();
                    out.push(Part::End);
                }
                1 => out.push(Part::Element(self.take()?)),
                _ => {}
            }
            return Ok(());
        }
        if self.depth == 0 {
            // The stream header: never closed until the stream ends.
            self.depth = 1;
            self.started = true;
            out.push(Part::Header(self.take()?));
            return Ok(());
        }
        if empty {
            if self.depth == 1 {
                out.push(Part::Element(self.take()?));
            }
        } else {
            self.depth += 1;
        }
        Ok(())
    }

    fn take(&mut self) -> Result<String, SplitError> {
        String::from_utf8(std::mem::take(&mut self.buf)).map_err(|_| SplitError::NotWellFormed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "<?xml version='1.0'?>\
        <stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='chat.example' version='1.0'>\
        <message to='1002-76730@chat.example' type='chat' id='a&gt;1'><body>1 &lt; 2 &amp; &quot;/&gt;&quot;</body><x xmlns='q' a=\"it's > here\"/></message>\n \
        <presence/>\
        <iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>\
        <message to='x'><body><![CDATA[<not a tag> ]] ]]]></body></message>\
        </stream:stream>";

    fn parts(chunk: usize, input: &str) -> Result<Vec<Part>, SplitError> {
        let mut s = Splitter::new(4096);
        let mut out = Vec::new();
        for c in input.as_bytes().chunks(chunk) {
            s.feed(c, &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn a_stream_splits_into_its_header_elements_and_end_wherever_reads_split_it() {
        let want = vec![
            Part::Header("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='chat.example' version='1.0'>".into()),
            Part::Element("<message to='1002-76730@chat.example' type='chat' id='a&gt;1'><body>1 &lt; 2 &amp; &quot;/&gt;&quot;</body><x xmlns='q' a=\"it's > here\"/></message>".into()),
            Part::Element("<presence/>".into()),
            Part::Element("<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>".into()),
            Part::Element("<message to='x'><body><![CDATA[<not a tag> ]] ]]]></body></message>".into()),
            Part::End,
        ];
        for chunk in [1, 2, 3, 7, 64, STREAM.len()] {
            assert_eq!(
                parts(chunk, STREAM).unwrap(),
                want,
                "{chunk} bytes at a time"
            );
        }
    }

    #[test]
    fn what_xmpp_forbids_and_what_is_too_long_end_the_stream() {
        let header = "<stream:stream xmlns='jabber:client'>";
        for bad in [
            "<!-- a comment -->",
            "<!DOCTYPE x>",
            "<?pi here?>",
            "top-level text",
            "</not-open></x>",
            "<a <b>",
        ] {
            assert_eq!(
                parts(1, &format!("{header}{bad}")).err(),
                Some(SplitError::NotWellFormed),
                "{bad}"
            );
        }
        let long = format!(
            "{header}<message><body>{}</body></message>",
            "x".repeat(5000)
        );
        assert_eq!(parts(100, &long).err(), Some(SplitError::TooLarge(4096)));
        // The bound holds for the header too, and across any split.
        let long_header = format!("<stream:stream to='{}'>", "x".repeat(5000));
        assert_eq!(
            parts(3, &long_header).err(),
            Some(SplitError::TooLarge(4096))
        );
    }
}
