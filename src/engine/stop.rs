//! Stop strings: generation ends at the first occurrence of any of them, and
//! no part of a stop string ever reaches the client. Text that could be the
//! beginning of a stop string is held back until the next token shows
//! whether it is.

pub struct StopStrings {
    stops: Vec<String>,
    /// Text not yet released: it may be the start of a stop string.
    pending: String,
}

/// What a new piece of text releases.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// The stop string that matched, ending generation.
    pub stopped_on: Option<String>,
    /// After a match: the text that followed the stop string (never sent as
    /// output; tool-call parsing continues from it).
    pub rest: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> Released {
        if self.stops.is_empty() {
            return Released {
                text: piece.to_string(),
                stopped_on: None,
                rest: String::new(),
            };
        }
        self.pending.push_str(piece);
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = first_match {
            let stop = stop.clone();
            let text = self.pending[..at].to_string();
            let rest = self.pending[at + stop.len()..].to_string();
            self.pending.clear();
            return Released {
                text,
                stopped_on: Some(stop),
                rest,
            };
        }
        let keep = self.longest_stop_prefix_suffix();
        let text = self.pending[..self.pending.len() - keep].to_string();
        self.pending.drain(..self.pending.len() - keep);
        Released {
            text,
            stopped_on: None,
            rest: String::new(),
        }
    }

    /// The held-back text, at the end of generation without a stop match.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Bytes at the end of `pending` that begin some stop string.
    fn longest_stop_prefix_suffix(&self) -> usize {
        let text = &self.pending;
        (1..=text.len())
            .rev()
            .filter(|&n| text.is_char_boundary(text.len() - n))
            .find(|&n| self.stops.iter().any(|s| s.starts_with(&text[text.len() - n..])))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_released_once_it_cannot_start_a_stop_string() {
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("hello E").text, "hello ");
        assert_eq!(s.push("Xy").text, "EXy");
        assert_eq!(s.flush(), "");
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_never_leaked() {
        let mut s = StopStrings::new(vec!["\n\nUser:".into(), "###".into()]);
        assert_eq!(s.push("Answer.\n").text, "Answer.");
        assert_eq!(s.push("\nUs").text, "");
        let end = s.push("er: more");
        assert_eq!(
            end,
            Released {
                text: String::new(),
                stopped_on: Some("\n\nUser:".into()),
                rest: " more".into()
            }
        );
    }

    #[test]
    fn the_earliest_of_several_matches_wins_and_held_text_flushes_at_the_end() {
        let mut s = StopStrings::new(vec!["b".into(), "a".into()]);
        assert_eq!(s.push("xab").stopped_on.as_deref(), Some("a"));
        let mut s = StopStrings::new(vec!["é!".into()]);
        assert_eq!(s.push("caféé").text, "café");
        assert_eq!(s.flush(), "é");
    }
}
