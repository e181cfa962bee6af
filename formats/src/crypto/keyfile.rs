//! Key files: the one-line text form (`KIMBERLEY-KEY-1…`, bech32m) and the raw 32-byte form; pure encode and parse (docs/FORMAT.md "Key files").

use bech32::primitives::decode::{CheckedHrpstring, CheckedHrpstringError};
use bech32::{Bech32m, Hrp};

use super::keys::KEY_LEN;

/// The bech32 human-readable part; with bech32's separator `1` a text key
/// starts with `KIMBERLEY-KEY-1`.
pub const HRP: &str = "kimberley-key-";

/// What every text key starts with (in upper case, as [`encode`] writes it).
pub const TEXT_PREFIX: &str = "KIMBERLEY-KEY-1";

/// Length of a text key without its line end: the prefix, 52 data
/// characters (256 bits in 5-bit groups, 4 zero padding bits) and the
/// 6-character bech32m checksum.
pub const TEXT_LEN: usize = TEXT_PREFIX.len() + 52 + 6;

/// Why bytes are not a key file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// Neither 32 raw bytes nor a line starting with the text prefix.
    #[error(
        "not a key file: {len} bytes, neither a 32-byte raw key nor a {TEXT_PREFIX}… text key"
    )]
    Unrecognised { len: usize },
    /// Starts like a text key but is not valid bech32m (a mistyped or
    /// truncated character, mixed case, a wrong checksum).
    #[error("malformed {TEXT_PREFIX}… text key: {0}")]
    Bech32(String),
    /// A valid bech32m string that does not hold exactly one key.
    #[error("malformed {TEXT_PREFIX}… text key: {0}")]
    Payload(&'static str),
}

/// The text form of `key`, without a line end: `KIMBERLEY-KEY-1` followed
/// by the 32 bytes in bech32m, upper case.
pub fn encode(key: &[u8; KEY_LEN]) -> String {
    bech32::encode_upper::<Bech32m>(Hrp::parse_unchecked(HRP), key)
        .expect("a 32-byte payload is far below bech32m's length limit")
}

/// Parses a key file's bytes: exactly 32 raw bytes, or the text form with
/// at most one line end (`\n` or `\r\n`) after it. Anything else is
/// refused; only the one canonical spelling of a key (all upper or all
/// lower case, zero padding bits) is accepted.
pub fn parse(bytes: &[u8]) -> Result<[u8; KEY_LEN], KeyFileError> {
    if let Ok(raw) = <[u8; KEY_LEN]>::try_from(bytes) {
        return Ok(raw);
    }
    let line = bytes
        .strip_suffix(b"\r\n")
        .or_else(|| bytes.strip_suffix(b"\n"))
        .unwrap_or(bytes);
    let prefix_ok = line.len() >= TEXT_PREFIX.len()
        && line[..TEXT_PREFIX.len()].eq_ignore_ascii_case(TEXT_PREFIX.as_bytes());
    let text = match std::str::from_utf8(line) {
        Ok(t) if prefix_ok => t,
        _ => return Err(KeyFileError::Unrecognised { len: bytes.len() }),
    };
    let data_part = &text[TEXT_PREFIX.len()..];
    if let Some((i, c)) = data_part
        .char_indices()
        .find(|&(_, c)| bech32::Fe32::from_char(c).is_err())
    {
        return Err(KeyFileError::Bech32(format!(
            "invalid character {:?} at offset {}",
            c,
            TEXT_PREFIX.len() + i
        )));
    }
    let (upper, lower) = (
        text.bytes().any(|b| b.is_ascii_uppercase()),
        text.bytes().any(|b| b.is_ascii_lowercase()),
    );
    if upper && lower {
        return Err(KeyFileError::Bech32("mixed upper and lower case".into()));
    }
    let checked = CheckedHrpstring::new::<Bech32m>(text).map_err(|e| {
        KeyFileError::Bech32(match e {
            CheckedHrpstringError::Checksum(_) => {
                "checksum mismatch (a mistyped, missing or extra character)".into()
            }
            other => chain(&other).escape_debug().to_string(),
        })
    })?;
    if checked.hrp() != Hrp::parse_unchecked(HRP) {
        return Err(KeyFileError::Payload("wrong prefix"));
    }
    let data: Vec<u8> = checked.byte_iter().collect();
    let key: [u8; KEY_LEN] = data
        .as_slice()
        .try_into()
        .map_err(|_| KeyFileError::Payload("it does not hold exactly 32 bytes"))?;
    // 52 characters carry 260 bits: the last 4 must be zero, so that a key
    // has one spelling (per case).
    if !encode(&key).eq_ignore_ascii_case(text) {
        return Err(KeyFileError::Payload("it does not hold exactly 32 bytes"));
    }
    Ok(key)
}

/// An error and its causes on one line (bech32's own top-level messages
/// say only "parse failed").
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        parts.push(c.to_string());
        cur = c.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_line_ends() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8 * 7);
        let t = encode(&key);
        assert!(t.starts_with(TEXT_PREFIX), "{t}");
        assert_eq!(t.len(), TEXT_LEN);
        for s in [
            t.clone(),
            format!("{t}\n"),
            format!("{t}\r\n"),
            t.to_lowercase(),
        ] {
            assert_eq!(parse(s.as_bytes()), Ok(key), "{s:?}");
        }
        assert_eq!(parse(&key), Ok(key));
    }

    #[test]
    fn refuses_everything_else() {
        let key = [0x4b; 32];
        let t = encode(&key);
        let mut flipped = t.clone().into_bytes();
        // One mistyped data character: the checksum catches it.
        let i = TEXT_PREFIX.len() + 10;
        flipped[i] = if flipped[i] == b'Q' { b'P' } else { b'Q' };
        let mixed = format!("{}{}", &t[..20], t[20..].to_lowercase());
        let short = bech32::encode_upper::<Bech32m>(Hrp::parse_unchecked(HRP), &key[..31]).unwrap();
        let other =
            bech32::encode_upper::<Bech32m>(Hrp::parse_unchecked("age-secret-key-"), &key).unwrap();
        let bech32_not_m =
            bech32::encode_upper::<bech32::Bech32>(Hrp::parse_unchecked(HRP), &key).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "0 bytes"),
            (vec![0; 31], "31 bytes"),
            (vec![0; 33], "33 bytes"),
            (format!("{t}\n\n").into_bytes(), "invalid character '\\n'"),
            (format!(" {t}").into_bytes(), "neither"),
            (format!("{t} ").into_bytes(), "invalid character ' '"),
            (flipped, "checksum mismatch"),
            (mixed.into_bytes(), "mixed upper and lower case"),
            (short.into_bytes(), "exactly 32 bytes"),
            (other.into_bytes(), "neither"),
            (bech32_not_m.into_bytes(), "checksum mismatch"),
            (b"KIMBERLEY-KEY-1".to_vec(), "malformed"),
            (b"KIMBERLEY-KEY-1QQQ\xff".to_vec(), "neither"),
        ];
        for (bytes, needle) in cases {
            let e = parse(&bytes).expect_err(&String::from_utf8_lossy(&bytes));
            assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
        }
    }

    #[test]
    fn non_zero_padding_is_refused() {
        let t = encode(&[0; 32]);
        // The last data character carries the 4 padding bits: 'q' is 0, 'p' is 1.
        let mut fes: Vec<bech32::Fe32> = t[TEXT_PREFIX.len()..TEXT_LEN - 6]
            .chars()
            .map(|c| bech32::Fe32::from_char(c).unwrap())
            .collect();
        assert_eq!(fes.last(), Some(&bech32::Fe32::Q));
        *fes.last_mut().unwrap() = bech32::Fe32::P;
        let hrp = Hrp::parse_unchecked(HRP);
        let padded: String =
            bech32::primitives::encode::Encoder::<_, Bech32m>::new(fes.into_iter(), &hrp)
                .chars()
                .collect();
        assert!(
            CheckedHrpstring::new::<Bech32m>(&padded).is_ok(),
            "{padded}"
        );
        let e = parse(padded.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("exactly 32 bytes"), "{e}");
    }
}
