//! Where each node of a YAML document came from, so errors can name `file:line:column`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column in the pipeline file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

/// Dotted document path (`stages.square.params.cmd`, list items as `deps.0`) -> position of
/// the mapping key (or list item) that introduced it.
///
/// Built on the first lookup, not up front: only errors need positions, and a second parse of
/// a large pipeline would cost a quarter of its planning time on every run.
#[derive(Debug, Default, Clone)]
pub struct SourceMap {
    text: Arc<str>,
    positions: OnceLock<Positions>,
}

#[derive(Debug, Default, Clone)]
struct Positions {
    first: HashMap<String, Pos>,
    /// Later keys with the same text in one mapping (`1` and `"1"`), by path.
    repeats: HashMap<String, Vec<Pos>>,
}

impl SourceMap {
    /// A map over `text`; a document yaml-rust2 cannot read yields no positions (the serde_yaml
    /// error, which has its own position, is what the user sees then).
    pub fn build(text: &str) -> Self {
        Self {
            text: text.into(),
            positions: OnceLock::new(),
        }
    }

    fn all_positions(&self) -> &Positions {
        self.positions.get_or_init(|| {
            let mut builder = Builder::default();
            let mut parser = Parser::new_from_str(&self.text);
            match parser.load(&mut builder, false) {
                Ok(()) => builder.positions,
                Err(_) => Positions::default(),
            }
        })
    }

    fn positions(&self) -> &HashMap<String, Pos> {
        &self.all_positions().first
    }

    /// Every key written for exactly `path`, in file order: more than one when one mapping
    /// holds keys of the same text, such as `1` and `"1"`.
    pub fn every(&self, path: &str) -> Vec<Pos> {
        let all = self.all_positions();
        let mut out: Vec<Pos> = all.first.get(path).copied().into_iter().collect();
        out.extend(all.repeats.get(path).into_iter().flatten().copied());
        out
    }

    /// The position of `path`, or of its nearest ancestor that has one. Op params written as
    /// stage shorthand (`cmd:` beside `op:`) are found under `stages.S.params.cmd` too.
    pub fn find(&self, path: &str) -> Option<Pos> {
        let positions = self.positions();
        let mut current = path.to_string();
        loop {
            if let Some(pos) = positions.get(&current) {
                return Some(*pos);
            }
            if let Some(short) = shorthand_path(&current) {
                if let Some(pos) = positions.get(&short) {
                    return Some(*pos);
                }
            }
            match current.rfind('.') {
                Some(i) => current.truncate(i),
                None => return None,
            }
        }
    }
}

/// `stages.S.params.x...` -> `stages.S.x...`.
fn shorthand_path(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.splitn(4, '.').collect();
    match parts.as_slice() {
        ["stages", stage, "params", rest] => Some(format!("stages.{stage}.{rest}")),
        _ => None,
    }
}

enum Frame {
    Map {
        path: String,
        expecting_key: bool,
        key: Option<(String, Pos)>,
    },
    Seq {
        path: String,
        index: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    positions: Positions,
}

fn join(base: &str, segment: &str) -> String {
    if base.is_empty() {
        segment.to_string()
    } else {
        format!("{base}.{segment}")
    }
}

impl Builder {
    /// The path of a value about to start at `mark`, recording its position.
    fn value_path(&mut self, mark: Marker) -> Option<String> {
        let pos = Pos {
            line: mark.line(),
            col: mark.col() + 1,
        };
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map {
                path,
                expecting_key,
                key,
            }) => {
                let (k, key_pos) = key.take()?;
                *expecting_key = true;
                let p = join(path, &k);
                match self.positions.first.entry(p.clone()) {
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(key_pos);
                    }
                    std::collections::hash_map::Entry::Occupied(_) => {
                        self.positions
                            .repeats
                            .entry(p.clone())
                            .or_default()
                            .push(key_pos);
                    }
                }
                Some(p)
            }
            Some(Frame::Seq { path, index }) => {
                let p = join(path, &index.to_string());
                *index += 1;
                self.positions.first.entry(p.clone()).or_insert(pos);
                Some(p)
            }
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos {
            line: mark.line(),
            col: mark.col() + 1,
        };
        match ev {
            Event::Scalar(text, ..) => {
                if let Some(Frame::Map {
                    expecting_key, key, ..
                }) = self.stack.last_mut()
                {
                    if *expecting_key {
                        *key = Some((text, pos));
                        *expecting_key = false;
                        return;
                    }
                }
                self.value_path(mark);
            }
            Event::Alias(_) => {
                self.value_path(mark);
            }
            Event::MappingStart(..) => {
                if let Some(Frame::Map {
                    expecting_key: true,
                    ..
                }) = self.stack.last()
                {
                    // A complex (mapping) key: not something a pipeline uses; ignore its inside.
                    self.stack.push(Frame::Map {
                        path: "?".into(),
                        expecting_key: true,
                        key: None,
                    });
                    return;
                }
                let path = self.value_path(mark).unwrap_or_else(|| "?".into());
                self.stack.push(Frame::Map {
                    path,
                    expecting_key: true,
                    key: None,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.value_path(mark).unwrap_or_else(|| "?".into());
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_items_and_shorthand() {
        let text = "name: demo\nstages:\n  make:\n    op: shell\n    cmd: \"echo\"\n    deps:\n      - a.txt\n      - b.txt\n  other:\n    params: {x: 1}\n";
        let map = SourceMap::build(text);
        assert_eq!(map.find("name"), Some(Pos { line: 1, col: 1 }));
        assert_eq!(map.find("stages.make.op"), Some(Pos { line: 4, col: 5 }));
        assert_eq!(
            map.find("stages.make.params.cmd"),
            Some(Pos { line: 5, col: 5 })
        );
        assert_eq!(
            map.find("stages.make.deps.1"),
            Some(Pos { line: 8, col: 9 })
        );
        assert_eq!(
            map.find("stages.other.params.x"),
            Some(Pos { line: 10, col: 14 })
        );
        // unknown leaf falls back to its parent
        assert_eq!(map.find("stages.make.nope"), Some(Pos { line: 3, col: 3 }));
    }

    #[test]
    fn keys_of_the_same_text_are_all_found() {
        let map = SourceMap::build("m:\n  1: a\n  x: b\n  \"1\": c\n");
        assert_eq!(
            map.every("m.1"),
            vec![Pos { line: 2, col: 3 }, Pos { line: 4, col: 3 }]
        );
        assert_eq!(map.every("m.x"), vec![Pos { line: 3, col: 3 }]);
        assert!(map.every("m.y").is_empty());
    }
}
