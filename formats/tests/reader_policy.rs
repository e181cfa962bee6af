//! The reader policy (issue 7, findings 1 and 10): a reader holding a
//! secret refuses overlays not sealed with it, and refuses Argon2id costs
//! over its caps before deriving anything.

mod common;

use std::io::Cursor;
use std::path::Path;
use std::time::Duration;

use common::*;
use kimberley_formats::apply::{Input, Opened};
use kimberley_formats::crypto::keys::{Argon2Params, KdfLimits, KeyMaterial, Secret};
use kimberley_formats::crypto::ReadPolicy;
use kimberley_formats::diff::{Parent, Protection};
use kimberley_formats::overlay::header::{Header, HEADER_LEN};
use kimberley_formats::vmdir::VmDir;
use kimberley_formats::Error;

const PW: &[u8] = b"correct horse";

const ALLOW: ReadPolicy = ReadPolicy {
    allow_unencrypted: true,
    kdf: KdfLimits::DEFAULT,
};

/// Asserts the apply was refused as unauthenticated and left nothing.
#[track_caller]
fn auth_refused(r: kimberley_formats::Result<impl std::fmt::Debug>, out: &Path) {
    match r {
        Err(e @ Error::Auth(_)) => {
            assert_eq!(e.exit_code(), 4);
            let m = e.to_string();
            assert!(
                m.contains("not encrypted") && m.contains("--allow-unencrypted"),
                "{m}"
            );
            assert!(!m.contains('\n'), "not one line: {m:?}");
        }
        other => panic!("expected an authentication refusal, got {other:?}"),
    }
    assert!(!out.exists(), "a refused apply left {}", out.display());
}

#[test]
fn an_unencrypted_overlay_is_refused_when_a_secret_is_given() {
    let t = tempfile::tempdir().unwrap();
    let p = small_pair(t.path(), 1);
    let (plain, _) = diff_bytes(&p.base, &p.launch, Protection::None, None);
    for (k, s) in [Secret::Key(KEY), Secret::Passphrase(PW.to_vec())]
        .into_iter()
        .enumerate()
    {
        let out = t.path().join(format!("refused{k}"));
        auth_refused(apply(&p.base, &[&plain], &out, Some(s.clone())), &out);
        let out = t.path().join(format!("allowed{k}"));
        apply_with(&p.base, &[&plain], &out, Some(s), ALLOW).unwrap();
        assert_same_vm(&out, &p.launch);
    }
    // Without a secret nothing changes: integrity only.
    let out = t.path().join("nokey");
    apply(&p.base, &[&plain], &out, None).unwrap();
    assert_same_vm(&out, &p.launch);
}

#[test]
fn a_flipped_protection_byte_does_not_downgrade() {
    let t = tempfile::tempdir().unwrap();
    let p = small_pair(t.path(), 2);
    let (sealed, _) = diff_bytes(&p.base, &p.launch, Protection::Key(KEY), None);
    let mut flipped = sealed.clone();
    flipped[12] = 0;
    // The attacker also recomputes the MAC of an unencrypted header.
    let mut remac = flipped.clone();
    let mut h = Header::decode(&remac[..HEADER_LEN]).unwrap();
    assert_eq!(h.protection, KeyMaterial::None);
    remac[..HEADER_LEN].copy_from_slice(&h.seal(None));
    for (k, ovl) in [flipped, remac].iter().enumerate() {
        let out = t.path().join(format!("out{k}"));
        auth_refused(apply(&p.base, &[ovl], &out, Some(Secret::Key(KEY))), &out);
        // Allowed or without a key it is still refused: it is not a valid
        // unencrypted overlay either.
        for (policy, secret) in [(ALLOW, Some(Secret::Key(KEY))), (ALLOW, None)] {
            let e = apply_with(&p.base, &[ovl], &out, secret, policy).unwrap_err();
            assert!(
                matches!(e, Error::Corrupt(_) | Error::WrongBase(_)),
                "{e:?}"
            );
            assert!(!out.exists());
        }
    }
}

#[test]
fn a_chain_with_one_unencrypted_layer_is_refused_with_a_key() {
    let t = tempfile::tempdir().unwrap();
    for d in ["1", "2"] {
        std::fs::create_dir(t.path().join(d)).unwrap();
    }
    let p1 = small_pair(&t.path().join("1"), 3);
    let p2 = small_pair(&t.path().join("2"), 4);
    let mid = VmDir::open(&p1.launch).unwrap().identity();
    // The unencrypted layer first, then on top; and the other way round.
    for (k, (prot1, prot2)) in [
        (Protection::None, Protection::Key(KEY)),
        (Protection::Key(KEY), Protection::None),
    ]
    .into_iter()
    .enumerate()
    {
        let (l1, _) = diff_bytes(&p1.base, &p1.launch, prot1, None);
        let h1 = Header::decode(&l1).unwrap();
        let parent = Parent {
            overlay_id: h1.overlay_id,
            depth: h1.depth,
            result_id: mid,
        };
        let (l2, _) = diff_bytes(&p1.launch, &p2.launch, prot2, Some(parent));
        let out = t.path().join(format!("out{k}"));
        auth_refused(
            apply(&p1.base, &[&l1, &l2], &out, Some(Secret::Key(KEY))),
            &out,
        );
        apply_with(&p1.base, &[&l1, &l2], &out, Some(Secret::Key(KEY)), ALLOW).unwrap();
        assert_same_vm(&out, &p2.launch);
    }
}

fn open(
    bytes: Vec<u8>,
    secret: Option<Secret>,
    policy: ReadPolicy,
) -> kimberley_formats::Result<Opened> {
    Opened::open(
        Input {
            name: "crafted".into(),
            reader: Box::new(Cursor::new(bytes)),
        },
        secret.as_ref(),
        &policy,
    )
}

#[test]
fn a_crafted_header_asking_for_an_expensive_kdf_is_refused_at_once() {
    // 192 bytes: a passphrase header asking for 1 GiB and 64 passes
    // (minutes of Argon2id and 1 GiB of memory before the MAC can fail).
    let bytes = crafted::expensive_kdf_header().to_vec();
    assert_eq!(bytes.len(), HEADER_LEN);
    // On a thread, so that a reader that starts Argon2 fails the test after
    // a second instead of holding it for minutes.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = open(
            bytes,
            Some(Secret::Passphrase(PW.to_vec())),
            ReadPolicy::default(),
        );
        let _ = tx.send(r.map(|_| ()).map_err(|e| (e.exit_code(), e.to_string())));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(1))
        .expect("still deriving a key after a second");
    let (code, msg) = r.expect_err("accepted");
    assert_eq!(code, 3, "{msg}");
    for needle in [
        "crafted",
        "Argon2id",
        "--max-kdf-memory",
        "--max-kdf-passes",
    ] {
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }
}

#[test]
fn a_raised_cap_accepts_a_header_within_it() {
    let t = tempfile::tempdir().unwrap();
    let p = small_pair(t.path(), 5);
    // 11 passes over 64 KiB: cheap, but over the default 10 passes.
    let params = Argon2Params {
        m_cost: 64,
        t_cost: 11,
        p_cost: 1,
    };
    let (ovl, _) = diff_bytes(
        &p.base,
        &p.launch,
        Protection::Passphrase(PW.to_vec(), params),
        None,
    );
    let pw = || Some(Secret::Passphrase(PW.to_vec()));
    let out = t.path().join("out");
    let e = apply(&p.base, &[&ovl], &out, pw()).unwrap_err();
    assert!(e.to_string().contains("--max-kdf-passes"), "{e}");
    assert!(!out.exists());
    let raised = ReadPolicy {
        kdf: KdfLimits {
            max_passes: 11,
            ..KdfLimits::DEFAULT
        },
        ..ReadPolicy::default()
    };
    apply_with(&p.base, &[&ovl], &out, pw(), raised).unwrap();
    assert_same_vm(&out, &p.launch);
    // And the memory cap: 64 KiB is over a lowered cap of 32 KiB.
    let low = ReadPolicy {
        kdf: KdfLimits {
            max_memory_kib: 32,
            max_passes: 11,
        },
        ..ReadPolicy::default()
    };
    let e = open(ovl, pw(), low).unwrap_err();
    assert!(e.to_string().contains("--max-kdf-memory"), "{e}");
}
