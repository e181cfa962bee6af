//! `kimberlize inspect`: an overlay, or a VM directory.

use std::io::Read;

use anyhow::{Context, Result};
use kimberley_cli::output::open_input;
use kimberley_cli::schema::JsonOutput;
use kimberley_formats::apply::{self, Input, Opened};
use kimberley_formats::crypto::KeyMaterial;
use kimberley_formats::digest::hex;
use kimberley_formats::digest::short_id;
use kimberley_formats::overlay::header::{Header, HEADER_LEN};
use kimberley_formats::overlay::io::FrameReader;
use kimberley_formats::progress::Progress;
use kimberley_formats::vmdir::VmDir;
use serde_json::json;

use crate::cli::InspectArgs;

pub fn inspect(a: InspectArgs) -> Result<()> {
    if a.overlay.is_dir() {
        return inspect_vmdir(&a);
    }
    a.keys.check_stdin(a.overlay.as_os_str() == "-")?;
    let secret = a.keys.secret()?;
    let (name, mut reader) = open_input(&a.overlay)?;
    // Peek at the header to know whether a key is needed.
    let mut head = vec![0u8; HEADER_LEN];
    let n = read_up_to(&mut reader, &mut head)?;
    head.truncate(n);
    let header = Header::decode(&head)?;
    let chained: Box<dyn Read + Send> = Box::new(std::io::Cursor::new(head).chain(reader));
    let mut out = json!({
        "schema": JsonOutput::InspectOverlay.version(),
        "file": name,
        "version": header.version,
        "protection": match header.protection {
            KeyMaterial::None => "none (BLAKE3 integrity only)".to_string(),
            KeyMaterial::KeyFile => "ChaCha20-Poly1305, key file".to_string(),
            KeyMaterial::Passphrase(p) => format!("ChaCha20-Poly1305, passphrase (Argon2id m={} KiB t={} p={})", p.m_cost, p.t_cost, p.p_cost),
        },
        "overlay_id": hex(&header.overlay_id),
        "base_id": hex(&header.base_id),
        "result_id": hex(&header.result_id),
        "ids_keyed": header.protection != KeyMaterial::None,
        "depth": header.depth,
        "parent_id": if header.has_parent() { json!(hex(&header.parent_id)) } else { json!(null) },
    });
    let can_open = header.protection == KeyMaterial::None || secret.is_some();
    if can_open {
        let o = Opened::open(
            Input {
                name: name.clone(),
                reader: chained,
            },
            secret.as_ref(),
            &a.read.policy(),
        )?;
        let authenticated = o.keys.is_some();
        let m = &o.manifest;
        out["launch"] = json!({
            "name": m.name,
            "vcpus": m.vcpus,
            "components": m.launch.iter().map(|c| json!({"kind": format!("{:?}", c.kind).to_lowercase(), "size": c.size, "blake3": hex(&c.digest)})).collect::<Vec<_>>(),
        });
        let threads = kimberley_cli::run::threads(None);
        let r = apply::verify(o, threads, &Progress::default())?;
        out["verified"] = json!(true);
        out["authenticated"] = json!(authenticated);
        out["bytes"] = json!(r.bytes);
        out["segments"] = json!(r.segments);
        out["records"] = json!(r.records);
        out["chunks"] = serde_json::to_value(r.chunks)?;
    } else {
        // Walk the frames without opening them.
        let mut fr = FrameReader::new(chained);
        fr.header()?;
        let (mut frames, mut sizes) = (0u64, Vec::new());
        while let Some(f) = fr.next_frame()? {
            frames += 1;
            sizes.push(f.len());
        }
        sizes.sort_unstable();
        out["verified"] = json!(false);
        out["authenticated"] = json!(false);
        out["note"] = json!(
            "encrypted: give --key-file or --passphrase-file to authenticate and show contents"
        );
        out["bytes"] = json!(fr.bytes_read);
        // Not data segments: the manifest, the index, and in version 2
        // the coverage map.
        let others = if header.has_map() { 3 } else { 2 };
        out["segments"] = json!(frames.saturating_sub(others));
        out["frame_bytes_median"] = json!(sizes.get(sizes.len() / 2));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_text(&out);
    }
    Ok(())
}

/// `kimberlize inspect VMDIR`.
fn inspect_vmdir(a: &InspectArgs) -> Result<()> {
    let dir = VmDir::open(&a.overlay)?;
    let m = &dir.manifest;
    let id = dir.identity();
    let mut components = Vec::new();
    for (i, c) in m.components.iter().enumerate() {
        let meta = dir
            .open_component(i)?
            .metadata()
            .with_context(|| format!("reading {}", dir.component_path(i).display()))?;
        components.push(json!({
            "kind": format!("{:?}", c.kind).to_lowercase(),
            "file": m.file_name(i),
            "size": c.size,
            "allocated": std::os::unix::fs::MetadataExt::blocks(&meta) * 512,
            "blake3": hex(&c.digest),
        }));
    }
    let out = json!({
        "schema": JsonOutput::InspectVmdir.version(),
        "vmdir": dir.path.display().to_string(),
        "name": m.name,
        "identity": short_id(&id),
        "identity_full": hex(&id),
        "backend": m.machine.as_ref().map_or("microvm", |s| s.backend.as_str()),
        "machine": m.machine.as_deref(),
        "vcpus": m.vcpus,
        "memory_size": m.memory_size(),
        "components": components,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("VM directory {}", dir.path.display());
    println!("name         {}", m.name);
    println!("identity     {} (BLAKE3 {})", short_id(&id), hex(&id));
    match m.machine.as_deref() {
        None => println!("backend      microvm (the KVM microVM)"),
        Some(s) => println!(
            "backend      {} {}, machine {}, accel {}, cpu {}",
            s.backend, s.version, s.machine_type, s.accel, s.cpu
        ),
    }
    println!("vCPUs        {}", m.vcpus);
    for c in &components {
        println!(
            "  {:<8} {:<12} {:>14} bytes  {:>14} allocated  blake3 {}",
            c["kind"].as_str().unwrap_or(""),
            c["file"].as_str().unwrap_or(""),
            c["size"],
            c["allocated"],
            c["blake3"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn read_up_to(r: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = r.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

fn print_text(v: &serde_json::Value) {
    let s = |k: &str| {
        v.get(k)
            .map(|x| x.to_string().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    println!("overlay      {}", s("file"));
    println!("format       version {}", s("version"));
    println!("protection   {}", s("protection"));
    println!("overlay id   {}", s("overlay_id"));
    let keyed = if v["ids_keyed"] == serde_json::Value::Bool(true) {
        " (keyed)"
    } else {
        ""
    };
    println!("base id      {}{keyed}", s("base_id"));
    println!("result id    {}{keyed}", s("result_id"));
    if s("depth") == "0" {
        println!("chain        layer 0: applies directly to the base VM");
    } else {
        println!(
            "chain        layer {}: needs parent overlay {} applied first",
            s("depth"),
            s("parent_id")
        );
    }
    println!(
        "size         {} bytes in {} data segments",
        s("bytes"),
        s("segments")
    );
    if let Some(l) = v.get("launch") {
        println!(
            "launch VM    {} ({} vCPU)",
            l["name"].as_str().unwrap_or(""),
            l["vcpus"]
        );
        for c in l["components"].as_array().into_iter().flatten() {
            println!(
                "  {:<8} {:>14} bytes  blake3 {}",
                c["kind"].as_str().unwrap_or(""),
                c["size"],
                c["blake3"].as_str().unwrap_or("")
            );
        }
        let c = &v["chunks"];
        println!(
            "chunks       {} unchanged, {} zero, {} base refs, {} self refs, {} deltas, {} literal",
            c["unchanged"], c["zero"], c["ref_base"], c["ref_self"], c["delta"], c["literal"]
        );
        let checked = if v["authenticated"] == serde_json::Value::Bool(true) {
            "every segment authenticated and parsed"
        } else {
            "checksums OK (not authenticated), every segment parsed"
        };
        println!("verified     {checked} ({} records)", s("records"));
    } else {
        println!("verified     no ({})", s("note"));
    }
}
