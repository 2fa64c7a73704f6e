//! Emu3's token vocabulary and sequence layout.
//!
//! Special and visual token ids come from `config.json`'s `vocabulary_map`, never from fixed
//! offsets. A text-to-image prompt is `BOS caption SOV "H*W" SOT`; the model then writes H rows
//! of W visual tokens, each closed by EOL, then EOF EOV EOS. (Emu3's own names: SOV is
//! `<|image start|>`, SOT `<|image token|>`, EOV `<|image end|>`.)

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

pub const BOS: &str = "<|extra_203|>";
pub const EOS: &str = "<|extra_204|>";
pub const PAD: &str = "<|endoftext|>";
pub const EOL: &str = "<|extra_200|>";
pub const EOF: &str = "<|extra_201|>";
pub const SOT: &str = "<|image token|>";
pub const SOV: &str = "<|image start|>";
pub const EOV: &str = "<|image end|>";
const VISUAL_PREFIX: &str = "<|visual token";

/// The ids the generator needs, resolved from `vocabulary_map`.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub eol: u32,
    pub eof: u32,
    pub sot: u32,
    pub sov: u32,
    pub eov: u32,
    /// code -> token id
    code_to_id: Vec<u32>,
    /// token id -> code (dense over ids up to the largest visual id)
    id_to_code: Vec<Option<u32>>,
}

impl Vocabulary {
    pub fn from_map(map: &HashMap<String, u32>) -> Result<Self> {
        let get = |name: &str| {
            map.get(name).copied().ok_or_else(|| {
                Error::Checkpoint(format!("config.json vocabulary_map has no {name:?} token"))
            })
        };
        // Like transformers' Emu3ImageVocabularyMapping: the code is the 6 digits before "|>".
        let mut pairs: Vec<(u32, u32)> = Vec::new();
        for (name, &id) in map {
            if !name.starts_with(VISUAL_PREFIX) {
                continue;
            }
            let digits = name.len().checked_sub(8).and_then(|s| name.get(s..name.len() - 2));
            let code = digits.and_then(|d| d.parse::<u32>().ok()).ok_or_else(|| {
                Error::Checkpoint(format!("vocabulary_map: malformed visual token {name:?}"))
            })?;
            pairs.push((code, id));
        }
        if pairs.is_empty() {
            return Err(Error::Checkpoint("config.json vocabulary_map has no <|visual token NNNNNN|> entries".into()));
        }
        pairs.sort_unstable();
        let n = pairs.len();
        if pairs.iter().enumerate().any(|(i, &(c, _))| c as usize != i) {
            return Err(Error::Checkpoint(format!(
                "vocabulary_map: visual tokens are not numbered 0..{n} without gaps"
            )));
        }
        let code_to_id: Vec<u32> = pairs.iter().map(|&(_, id)| id).collect();
        let max_id = *code_to_id.iter().max().expect("non-empty") as usize;
        let mut id_to_code = vec![None; max_id + 1];
        for (code, &id) in code_to_id.iter().enumerate() {
            id_to_code[id as usize] = Some(code as u32);
        }
        Ok(Self {
            bos: get(BOS)?,
            eos: get(EOS)?,
            pad: get(PAD)?,
            eol: get(EOL)?,
            eof: get(EOF)?,
            sot: get(SOT)?,
            sov: get(SOV)?,
            eov: get(EOV)?,
            code_to_id,
            id_to_code,
        })
    }

    /// Number of VQ codes (visual tokens).
    pub fn codebook_size(&self) -> usize {
        self.code_to_id.len()
    }

    pub fn code_id(&self, code: u32) -> u32 {
        self.code_to_id[code as usize]
    }

    pub fn id_code(&self, id: u32) -> Option<u32> {
        self.id_to_code.get(id as usize).copied().flatten()
    }

    /// Token ids of every code, in code order.
    pub fn visual_ids(&self) -> &[u32] {
        &self.code_to_id
    }

    /// The largest token id the vocabulary uses.
    pub fn max_id(&self) -> u32 {
        [self.bos, self.eos, self.pad, self.eol, self.eof, self.sot, self.sov, self.eov]
            .into_iter()
            .chain(self.code_to_id.iter().copied())
            .max()
            .unwrap_or(0)
    }
}

/// Text tokenizer (`tokenizer.json`) plus the vocabulary: builds Emu3 token sequences.
pub struct Prompter {
    tokenizer: tokenizers::Tokenizer,
    pub vocab: Vocabulary,
}

impl Prompter {
    pub fn new(tokenizer_json: &Path, vocab: Vocabulary) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
        Ok(Self { tokenizer, vocab })
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Plain text -> ids, without any special tokens added.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(format!("{text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `SOV "H*W" SOT`: the header that opens an image block of `h` x `w` tokens.
    pub fn image_header(&self, h: usize, w: usize) -> Result<Vec<u32>> {
        let mut ids = vec![self.vocab.sov];
        ids.extend(self.encode_text(&format!("{h}*{w}"))?);
        ids.push(self.vocab.sot);
        Ok(ids)
    }

    /// `BOS caption SOV "H*W" SOT`: a text-to-image generation prompt.
    pub fn t2i_prompt(&self, caption: &str, h: usize, w: usize) -> Result<Vec<u32>> {
        let mut ids = vec![self.vocab.bos];
        ids.extend(self.encode_text(caption)?);
        ids.extend(self.image_header(h, w)?);
        Ok(ids)
    }

    /// A whole image block for codes `(h, w)` row-major: header, rows each closed by EOL,
    /// then EOF EOV.
    pub fn image_block(&self, codes: &[u32], h: usize, w: usize) -> Result<Vec<u32>> {
        let mut ids = self.image_header(h, w)?;
        for row in codes.chunks(w) {
            ids.extend(row.iter().map(|&c| self.vocab.code_id(c)));
            ids.push(self.vocab.eol);
        }
        ids.push(self.vocab.eof);
        ids.push(self.vocab.eov);
        Ok(ids)
    }

    /// `BOS <source block> instruction SOV "H*W" SOT`: an instruction-edit prompt
    /// (Tessera's edit layout; the model writes the edited image's block).
    pub fn edit_prompt(&self, source: &[u32], h: usize, w: usize, instruction: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.vocab.bos];
        ids.extend(self.image_block(source, h, w)?);
        ids.extend(self.encode_text(instruction)?);
        ids.extend(self.image_header(h, w)?);
        Ok(ids)
    }
}

/// What the prefix constraint allows at offset `o` (1-based, relative to SOT) of an
/// `h` x `w` image block, in transformers' order of checks (port spec §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Any visual token: the cell at (row, col).
    Cell { row: usize, col: usize },
    /// Exactly this token.
    Forced(u32),
}

pub fn slot(vocab: &Vocabulary, o: usize, h: usize, w: usize) -> Slot {
    let end = (w + 1) * h;
    if o.is_multiple_of(w + 1) {
        Slot::Forced(vocab.eol)
    } else if o == end + 1 {
        Slot::Forced(vocab.eof)
    } else if o == end + 2 {
        Slot::Forced(vocab.eov)
    } else if o == end + 3 {
        Slot::Forced(vocab.eos)
    } else if o > end + 3 {
        Slot::Forced(vocab.pad)
    } else {
        Slot::Cell { row: (o - 1) / (w + 1), col: (o - 1) % (w + 1) }
    }
}

/// The number of tokens generated after SOT: h rows of (w + EOL), then EOF EOV EOS.
pub fn block_len(h: usize, w: usize) -> usize {
    (w + 1) * h + 3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Vocabulary {
        let mut m: HashMap<String, u32> = [BOS, EOS, PAD, EOL, EOF, SOT, SOV, EOV]
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), i as u32))
            .collect();
        for c in 0..5u32 {
            m.insert(format!("<|visual token {c:06}|>"), 100 + c);
        }
        Vocabulary::from_map(&m).unwrap()
    }

    #[test]
    fn visual_ids_come_from_the_map() {
        let v = vocab();
        assert_eq!(v.codebook_size(), 5);
        assert_eq!(v.code_id(3), 103);
        assert_eq!(v.id_code(104), Some(4));
        assert_eq!(v.id_code(7), None);
    }

    #[test]
    fn slots_follow_the_reference_order() {
        let v = vocab();
        let (h, w) = (2, 3);
        let got: Vec<Slot> = (1..=block_len(h, w) + 1).map(|o| slot(&v, o, h, w)).collect();
        use Slot::*;
        assert_eq!(
            got,
            vec![
                Cell { row: 0, col: 0 },
                Cell { row: 0, col: 1 },
                Cell { row: 0, col: 2 },
                Forced(v.eol),
                Cell { row: 1, col: 0 },
                Cell { row: 1, col: 1 },
                Cell { row: 1, col: 2 },
                Forced(v.eol),
                Forced(v.eof),
                Forced(v.eov),
                Forced(v.eos),
                // Past the end the modulo test still comes first: 12 % 4 == 0 gives EOL, not
                // PAD, exactly as in the reference helper.
                Forced(v.eol),
            ]
        );
    }
}
