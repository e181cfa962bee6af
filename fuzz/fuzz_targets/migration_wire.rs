//! The migration wire (vmigrate::protocol, vmigrate::chunks): hellos,
//! frame headers, every message body (STREAM_REFS opened too) and CHUNKS
//! bodies must never panic;
//! what decodes must encode back to what decodes equal. The first byte
//! picks the parser; for messages the second byte is the type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmigrate::protocol::{FrameHeader, Hello, Message, Role, Type, FRAME_HEADER, HELLO_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let Ok(b) = <[u8; HELLO_LEN]>::try_from(rest) else {
                return;
            };
            for role in [Role::Sender, Role::Receiver] {
                if let Ok(h) = Hello::decode(&b, role) {
                    assert_eq!(h.encode(), b, "hello round trip");
                }
            }
        }
        1 => {
            let Ok(b) = <[u8; FRAME_HEADER]>::try_from(rest) else {
                return;
            };
            for role in [Role::Sender, Role::Receiver] {
                if let Ok(h) = FrameHeader::decode(&b, role) {
                    assert_eq!(h.encode(), b, "frame header round trip");
                }
            }
        }
        2 => {
            let Some((&t, body)) = rest.split_first() else {
                return;
            };
            let Some(ty) = Type::from_u8(t) else { return };
            if let Ok(m) = Message::decode(ty, body.to_vec()) {
                assert_eq!(m.ty(), ty);
                if let Message::StreamRefs(r) = &m {
                    if let Ok((refs, literals)) = r.open() {
                        assert_eq!(refs.len(), r.count as usize);
                        assert_eq!(
                            literals.len() + refs.len() * vmigrate::protocol::REF_PAGE,
                            r.len as usize
                        );
                        assert!(refs.iter().all(|x| x.pos as usize + 4096 <= r.len as usize));
                    }
                }
                let again = Message::decode(ty, m.clone().encode()).expect("re-decodes");
                assert_eq!(again, m, "message round trip");
            }
        }
        _ => {
            if let Ok(d) = vmigrate::chunks::decode(rest) {
                for (_, e) in &d.entries {
                    if let vmigrate::chunks::Entry::Data(r) = e {
                        assert!(r.end <= d.plain.len(), "data range inside the body");
                    }
                }
            }
        }
    }
});
