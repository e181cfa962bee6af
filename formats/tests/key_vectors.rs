//! Golden key-file vectors (testdata/vectors/keys, FORMAT.md section 7.8):
//! every accepted file gives its listed key, every refused one its listed
//! message; `ok-text.key` holds the key of `key.bin`.
//!
//! `UPDATE_VECTORS=1 cargo test -p kimberley-formats --test key_vectors`
//! regenerates them (only when the format changes on purpose).

use std::path::{Path, PathBuf};

use kimberley_formats::crypto::keyfile::{self, TEXT_PREFIX};
use kimberley_formats::digest::hex;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/vectors/keys")
}

/// The key of `testdata/vectors/key.bin`.
const KEY: [u8; 32] = [0x4b; 32];

/// A vector: its file name, its bytes, and what it must give: `Ok(key)` or
/// `Err(text of the error)`.
type Case = (&'static str, Vec<u8>, Result<[u8; 32], &'static str>);

fn cases() -> Vec<Case> {
    let t = keyfile::encode(&KEY);
    let seq: [u8; 32] = std::array::from_fn(|i| i as u8);
    let mut typo = t.clone().into_bytes();
    typo[TEXT_PREFIX.len() + 5] = b'X';
    let hrp = bech32::Hrp::parse_unchecked(keyfile::HRP);
    let bech32_not_m = bech32::encode_upper::<bech32::Bech32>(hrp, &KEY).unwrap();
    let short = bech32::encode_upper::<bech32::Bech32m>(hrp, &KEY[..31]).unwrap();
    let long = bech32::encode_upper::<bech32::Bech32m>(hrp, &[0x4b; 33]).unwrap();
    let age = bech32::encode_upper::<bech32::Bech32>(
        bech32::Hrp::parse_unchecked("AGE-SECRET-KEY-"),
        &KEY,
    )
    .unwrap();
    vec![
        ("ok-text.key", format!("{t}\n").into_bytes(), Ok(KEY)),
        ("ok-text-no-newline.key", t.clone().into_bytes(), Ok(KEY)),
        ("ok-text-crlf.key", format!("{t}\r\n").into_bytes(), Ok(KEY)),
        (
            "ok-text-lower.key",
            format!("{}\n", t.to_lowercase()).into_bytes(),
            Ok(KEY),
        ),
        (
            "ok-text-sequence.key",
            format!("{}\n", keyfile::encode(&seq)).into_bytes(),
            Ok(seq),
        ),
        ("ok-raw.key", KEY.to_vec(), Ok(KEY)),
        ("ok-raw-newlines.key", vec![b'\n'; 32], Ok([b'\n'; 32])),
        ("bad-empty.key", vec![], Err("0 bytes, neither")),
        (
            "bad-raw-31.key",
            KEY[..31].to_vec(),
            Err("31 bytes, neither"),
        ),
        (
            "bad-raw-33.key",
            [KEY.as_slice(), b"\n"].concat(),
            Err("33 bytes, neither"),
        ),
        ("bad-typo.key", typo, Err("checksum mismatch")),
        (
            "bad-bech32-not-m.key",
            bech32_not_m.into_bytes(),
            Err("checksum mismatch"),
        ),
        (
            "bad-mixed-case.key",
            format!("{}{}\n", &t[..30], t[30..].to_lowercase()).into_bytes(),
            Err("mixed upper and lower case"),
        ),
        (
            "bad-two-newlines.key",
            format!("{t}\n\n").into_bytes(),
            Err("invalid character '\\n'"),
        ),
        (
            "bad-trailing-space.key",
            format!("{t} \n").into_bytes(),
            Err("invalid character ' '"),
        ),
        (
            "bad-leading-space.key",
            format!(" {t}\n").into_bytes(),
            Err("neither"),
        ),
        (
            "bad-short-payload.key",
            short.into_bytes(),
            Err("exactly 32 bytes"),
        ),
        (
            "bad-long-payload.key",
            long.into_bytes(),
            Err("exactly 32 bytes"),
        ),
        ("bad-age-key.key", age.into_bytes(), Err("neither")),
        (
            "bad-hex.key",
            format!("{}\n", hex(&KEY)).into_bytes(),
            Err("65 bytes, neither"),
        ),
    ]
}

fn generate() {
    let d = dir();
    std::fs::create_dir_all(&d).unwrap();
    let mut tsv = String::from("# file\tkey (hex) or error\ttext the error message contains\n");
    for (name, bytes, want) in cases() {
        std::fs::write(d.join(name), &bytes).unwrap();
        match want {
            Ok(k) => tsv.push_str(&format!("{name}\t{}\t\n", hex(&k))),
            Err(m) => tsv.push_str(&format!("{name}\terror\t{m}\n")),
        }
    }
    std::fs::write(d.join("expect.tsv"), tsv).unwrap();
}

#[test]
fn key_file_vectors() {
    if std::env::var("UPDATE_VECTORS").is_ok_and(|v| v == "1") {
        generate();
    }
    let d = dir();
    let expect = std::fs::read_to_string(d.join("expect.tsv")).expect("keys/expect.tsv");
    let (mut ok, mut bad) = (0, 0);
    for line in expect
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 3, "bad row {line:?}");
        let bytes = std::fs::read(d.join(f[0])).unwrap();
        match (keyfile::parse(&bytes), f[1]) {
            (Ok(k), "error") => panic!("{}: accepted as {}", f[0], hex(&k)),
            (Ok(k), want) => {
                assert_eq!(hex(&k), want, "{}", f[0]);
                ok += 1;
            }
            (Err(e), "error") => {
                assert!(
                    e.to_string().contains(f[2]),
                    "{}: {e} lacks {:?}",
                    f[0],
                    f[2]
                );
                bad += 1;
            }
            (Err(e), _) => panic!("{}: refused: {e}", f[0]),
        }
    }
    assert!(ok >= 5 && bad >= 10, "{ok} accepted, {bad} refused rows");
    // The generator's cases and the stored files agree: nothing stale.
    for (name, bytes, _) in cases() {
        assert_eq!(
            std::fs::read(d.join(name)).unwrap(),
            bytes,
            "{name} is stale"
        );
    }
}

#[test]
fn the_text_form_holds_the_key_of_key_bin() {
    let read = |name: &str| keyfile::parse(&std::fs::read(dir().join(name)).unwrap());
    assert_eq!(read("ok-text.key").unwrap(), read("../key.bin").unwrap());
    assert!(read("bad-typo.key").is_err());
}
