//! The client against Debian's docker-registry on loopback, and against
//! small fake servers for what a real registry does not do (hostile realms,
//! oversized answers).

#[path = "common/oci.rs"]
mod oci;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use kimberley_registry::manifest::{ChainConfig, LayerInfo};
use kimberley_registry::{Client, ClientOptions, Digest, Error, Manifest, Reference};

fn opts(chunk: u64) -> ClientOptions {
    ClientOptions {
        chunk_size: chunk,
        auth_file: Some("/nonexistent/kimberley-test-auth.json".into()),
        ..Default::default()
    }
}

fn blob(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

fn put_blob(c: &Client, bytes: &[u8]) -> Digest {
    let d = Digest::of(bytes);
    let f = tempfile::tempfile().unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, 0).unwrap();
    c.upload_blob(&d, &f, bytes.len() as u64, &|_| {}).unwrap();
    d
}

#[test]
fn blobs_and_manifests_round_trip() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let r = Reference::parse(&format!("{}/apps/office:v1", reg.addr())).unwrap();
    let c = Client::new(&r, &opts(64 << 10), true).unwrap();
    c.ping().unwrap();
    // Monolithic (one PUT) and chunked (PATCH by 64 KiB, not a multiple).
    let small = blob(1000, 1);
    let big = blob(300_000, 2);
    let ds = put_blob(&c, &small);
    let db = put_blob(&c, &big);
    assert_eq!(c.blob_size(&ds).unwrap(), Some(1000));
    assert_eq!(c.blob_size(&db).unwrap(), Some(300_000));
    assert_eq!(c.blob_size(&Digest::of(b"absent")).unwrap(), None);
    let mut got = Vec::new();
    let mut s = c.get_blob(&db, 0).unwrap();
    assert_eq!(s.start, 0);
    s.reader.read_to_end(&mut got).unwrap();
    assert_eq!(got, big);
    // A range read starts where asked.
    let mut s = c.get_blob(&db, 123_456).unwrap();
    assert_eq!(s.start, 123_456);
    let mut tail = Vec::new();
    s.reader.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, &big[123_456..]);
    // Mounting into another repository.
    let r2 = Reference::parse(&format!("{}/apps/other:v1", reg.addr())).unwrap();
    let c2 = Client::new(&r2, &opts(64 << 10), true).unwrap();
    assert_eq!(c2.blob_size(&db).unwrap(), None);
    assert!(c2.mount_blob(&db, "apps/office").unwrap());
    assert_eq!(c2.blob_size(&db).unwrap(), Some(300_000));
    // A manifest naming them (layer annotations as from headers).
    let layers = vec![LayerInfo {
        digest: db,
        size: 300_000,
        overlay_id: [7; 16],
        parent_id: None,
        depth: 0,
        base_id: [1; 32],
        result_id: [2; 32],
        protection: "none",
    }];
    let config = ChainConfig::of(&layers).encode();
    let dc = put_blob(&c, &config);
    let m = Manifest::for_chain(&layers, &config).unwrap();
    assert_eq!(m.config.digest, dc);
    let bytes = m.encode();
    let dm = c.put_manifest(r.tag.as_deref(), &bytes).unwrap();
    let (d1, b1) = c.get_manifest(&r).unwrap();
    assert_eq!((d1, &b1), (dm, &bytes));
    let (d2, _) = c.get_manifest(&r.with_digest(dm)).unwrap();
    assert_eq!(d2, dm);
    assert_eq!(Manifest::decode(&b1).unwrap(), m);
    let e = c
        .get_manifest(&Reference::parse(&format!("{}/apps/office:nope", reg.addr())).unwrap())
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
}

/// The proxy fixture counts what the registry sends and cuts it.
#[test]
fn proxy_counts_and_cuts() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let proxy = oci::Proxy::start(reg.port);
    let r = Reference::parse(&format!("{}/p/q:t", proxy.addr())).unwrap();
    let c = Client::new(&r, &opts(1 << 20), true).unwrap();
    let big = blob(500_000, 3);
    let d = put_blob(&c, &big);
    proxy.reset();
    let mut all = Vec::new();
    c.get_blob(&d, 0)
        .unwrap()
        .reader
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(all, big);
    assert!(
        proxy.down() >= 500_000 && proxy.down() < 510_000,
        "{}",
        proxy.down()
    );
    proxy.reset();
    proxy.cut_after(200_000);
    let mut part = Vec::new();
    let r = c.get_blob(&d, 0).unwrap().reader.read_to_end(&mut part);
    assert!(r.is_err() || part.len() < 200_000, "{}", part.len());
    assert!(part.len() < 200_000);
}

/// A chunked upload cut in the middle of a chunk recovers and the blob
/// arrives whole. (docker-registry 2.8 keeps part of the cut chunk and
/// then refuses the session, BLOB_UPLOAD_INVALID, either at once or at
/// the next chunk after reporting it resumable, so the client starts that
/// blob again: about 0.6 MB, and sometimes a chunk, sent twice here; a
/// registry whose upload status stays consistent is resumed from its
/// `Range` instead.)
#[test]
fn cut_chunked_upload_recovers() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let proxy = oci::Proxy::start(reg.port);
    let r = Reference::parse(&format!("{}/up/cut:t", proxy.addr())).unwrap();
    let c = Client::new(&r, &opts(256 << 10), true).unwrap();
    c.ping().unwrap();
    let big = blob(1_500_000, 9);
    proxy.reset();
    // In the middle of the third chunk.
    proxy.cut_upload_once_after(600_000);
    let d = put_blob(&c, &big);
    // At most: the 600 kB before the cut, one 256 KiB chunk the registry
    // refuses when the client resumes the session it reported, and the
    // whole blob again in a new session.
    assert!(
        proxy.up() > 1_500_000 && proxy.up() < 600_000 + 2 * (256 << 10) + 1_500_000,
        "{}",
        proxy.up()
    );
    let mut back = Vec::new();
    c.get_blob(&d, 0)
        .unwrap()
        .reader
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == big);
}

/// A one-thread HTTP server: `answer(request line, headers)` gives the
/// raw response. Returns its port and the requests it saw.
fn fake_server(
    answer: impl Fn(&str, &str, u16) -> Vec<u8> + Send + 'static,
) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut first = [0u8; 1];
            if r.read_exact(&mut first).is_err() {
                continue;
            }
            if first[0] == 0x16 {
                s2.lock().unwrap().push("TLS".into());
                continue;
            }
            let mut line = String::from(first[0] as char);
            r.read_line(&mut line).unwrap();
            let mut headers = String::new();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                headers.push_str(&h);
            }
            s2.lock().unwrap().push(format!("{line}{headers}"));
            let resp = answer(line.trim(), &headers, port);
            let _ = c.write_all(&resp);
        }
    });
    (port, seen)
}

fn response(status: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

/// Attack: a registry on loopback names a token realm over plain HTTP on
/// a host that is not loopback (0.0.0.0 reaches this machine, but is not a
/// loopback address): the credentials must not be sent there.
#[test]
fn credentials_never_go_to_a_plain_http_realm_off_loopback() {
    let (port, seen) = fake_server(|line, _h, port| {
        if line.starts_with("GET /token") {
            response("200 OK", "", br#"{"token":"t"}"#)
        } else {
            response(
                "401 Unauthorized",
                &format!("WWW-Authenticate: Bearer realm=\"http://0.0.0.0:{port}/token\",service=\"x\"\r\n"),
                b"",
            )
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("config.json");
    // user:secret
    std::fs::write(
        &auth,
        format!(r#"{{"auths":{{"127.0.0.1:{port}":{{"auth":"dXNlcjpzZWNyZXQ="}}}}}}"#),
    )
    .unwrap();
    let r = Reference::parse(&format!("127.0.0.1:{port}/a/b:t")).unwrap();
    let c = Client::new(
        &r,
        &ClientOptions {
            auth_file: Some(auth),
            ..Default::default()
        },
        false,
    )
    .unwrap();
    let e = c.ping().unwrap_err();
    assert!(matches!(e, Error::InsecureHttp(_)), "{e}");
    let seen = seen.lock().unwrap();
    assert!(
        !seen
            .iter()
            .any(|r| r.contains("/token") || r.contains("dXNlcjpzZWNyZXQ")),
        "credentials sent: {seen:?}"
    );
}

/// Attack: a registry not on loopback is spoken to over TLS only, unless
/// --insecure-http: the first bytes it gets are a TLS handshake.
#[test]
fn hosts_off_loopback_get_tls() {
    let (port, seen) = fake_server(|_l, _h, _p| response("200 OK", "", b"{}"));
    let r = Reference::parse(&format!("0.0.0.0:{port}/a/b:t")).unwrap();
    let c = Client::new(&r, &opts(1 << 20), false).unwrap();
    assert!(c.ping().is_err());
    assert_eq!(seen.lock().unwrap().as_slice(), ["TLS"]);
    let c = Client::new(
        &r,
        &ClientOptions {
            insecure_http: true,
            ..opts(1 << 20)
        },
        false,
    )
    .unwrap();
    c.ping().unwrap();
    assert!(seen.lock().unwrap()[1].starts_with("GET /v2/ HTTP/1.1"));
}

/// Attack: answers the client buffers are capped (a manifest of 5 MiB, an
/// endless token answer), and a blob redirect to plain HTTP off loopback is
/// refused.
#[test]
fn buffered_answers_are_capped_and_redirects_checked() {
    let (port, _) = fake_server(|line, _h, port| {
        if line.contains("/manifests/") {
            response("200 OK", "", &vec![b' '; 5 << 20])
        } else if line.starts_with("GET /token") {
            response("200 OK", "", &vec![b'x'; 1 << 20])
        } else if line.contains("/blobs/") {
            response(
                "307 Temporary Redirect",
                &format!("Location: http://0.0.0.0:{port}/elsewhere\r\n"),
                b"",
            )
        } else if line.starts_with("GET /v2/ ") {
            response(
                "401 Unauthorized",
                &format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\"\r\n"),
                b"",
            )
        } else {
            response("404 Not Found", "", b"")
        }
    });
    let r = Reference::parse(&format!("127.0.0.1:{port}/a/b:t")).unwrap();
    let c = Client::new(&r, &opts(1 << 20), false).unwrap();
    match c.get_manifest(&r) {
        Err(e) => assert!(matches!(e, Error::TooLarge { .. }), "{e}"),
        Ok((_, b)) => panic!("a manifest of {} bytes was read", b.len()),
    }
    let e = c.ping().unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    let e = c.get_blob(&Digest::of(b"x"), 0).err().unwrap();
    assert!(matches!(e, Error::InsecureHttp(_)), "{e}");
}
