//! DNS-SD over multicast DNS (`_kimberley._tcp`): the daemon advertises
//! its port, API version and base identities; a client browses for
//! cloudlets. Only a hint of where to connect: trust is the TLS check's.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV6};
use std::time::{Duration, Instant};

use mdns_sd::{ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo};

use crate::api::Info;

/// What went wrong with DNS-SD.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The mDNS responder could not start.
    #[error("starting mDNS: {0}")]
    Start(String),
    /// The advertisement could not be registered.
    #[error("advertising {0}: {1}")]
    Advertise(String, String),
    /// Browsing failed.
    #[error("browsing for cloudlets: {0}")]
    Browse(String),
}

/// The TXT key of the API version.
const TXT_API: &str = "api";
/// The TXT keys of the base identities: `b0`, `b1`, ... (one per string:
/// a TXT string holds at most 255 bytes).
const TXT_BASE: &str = "b";

/// The TXT record of a daemon with `info` (key, value pairs).
pub fn txt(info: &Info) -> Vec<(String, String)> {
    let mut v = vec![(TXT_API.to_string(), info.api.to_string())];
    for (i, b) in info.bases.iter().enumerate() {
        v.push((format!("{TXT_BASE}{i}"), b.identity.clone()));
    }
    v
}

/// The base identities in a TXT record (the `b0`, `b1`, ... values, in
/// order, up to the first missing one).
pub fn bases_of(get: impl Fn(&str) -> Option<String>) -> Vec<String> {
    (0..)
        .map_while(|i| get(&format!("{TXT_BASE}{i}")))
        .collect()
}

/// The host's name (`/proc/sys/kernel/hostname`), or `cloudlet`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cloudlet".into())
}

/// A registered advertisement: withdrawn when dropped.
pub struct Advert {
    daemon: ServiceDaemon,
    fullname: String,
}

impl std::fmt::Debug for Advert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Advert({})", self.fullname)
    }
}

impl Drop for Advert {
    fn drop(&mut self) {
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
        let _ = self.daemon.shutdown();
    }
}

/// Advertises instance `name` on `host` (e.g. `cloudlet1.local.`), `port`,
/// with `info`'s TXT record, on every interface's addresses.
pub fn advertise(name: &str, host: &str, port: u16, info: &Info) -> Result<Advert, DiscoveryError> {
    let daemon = ServiceDaemon::new().map_err(|e| DiscoveryError::Start(e.to_string()))?;
    let host = if host.ends_with('.') {
        host.to_string()
    } else {
        format!("{host}.")
    };
    let props: HashMap<String, String> = txt(info).into_iter().collect();
    let si = ServiceInfo::new(crate::SERVICE_TYPE, name, &host, "", port, props)
        .map_err(|e| DiscoveryError::Advertise(name.into(), e.to_string()))?
        .enable_addr_auto();
    let fullname = si.get_fullname().to_string();
    daemon
        .register(si)
        .map_err(|e| DiscoveryError::Advertise(name.into(), e.to_string()))?;
    Ok(Advert { daemon, fullname })
}

/// A cloudlet seen on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its instance name.
    pub name: String,
    /// Its host name (without the final dot): the name its certificate
    /// is checked against.
    pub host: String,
    /// Its addresses with the port (IPv4 first; an IPv6 one with the
    /// interface it was seen on as its scope).
    pub addresses: Vec<SocketAddr>,
    /// Its port.
    pub port: u16,
    /// Its API version (0 if it gave none).
    pub api: u32,
    /// The base identities it holds (hex).
    pub bases: Vec<String>,
}

fn found(r: &ResolvedService) -> Found {
    let get = |k: &str| r.get_property_val_str(k).map(str::to_string);
    let mut addresses: Vec<SocketAddr> = r
        .addresses
        .iter()
        .map(|a| match a {
            ScopedIp::V6(v6) => SocketAddr::V6(SocketAddrV6::new(
                *v6.addr(),
                r.port,
                0,
                v6.scope_id().index,
            )),
            other => SocketAddr::new(other.to_ip_addr(), r.port),
        })
        .collect();
    // IPv4 first, then in a stable order.
    addresses.sort_by_key(|a| (a.is_ipv6(), *a));
    Found {
        name: r
            .fullname
            .strip_suffix(&format!(".{}", crate::SERVICE_TYPE))
            .unwrap_or(&r.fullname)
            .to_string(),
        host: r.host.trim_end_matches('.').to_string(),
        addresses,
        port: r.port,
        api: get(TXT_API).and_then(|v| v.parse().ok()).unwrap_or(0),
        bases: bases_of(get),
    }
}

/// Browses for cloudlets for at most `timeout`; returns as soon as one
/// satisfies `enough` (with every one seen so far), else every one seen.
pub fn browse(
    timeout: Duration,
    enough: impl Fn(&Found) -> bool,
) -> Result<Vec<Found>, DiscoveryError> {
    let daemon = ServiceDaemon::new().map_err(|e| DiscoveryError::Start(e.to_string()))?;
    let rx = daemon
        .browse(crate::SERVICE_TYPE)
        .map_err(|e| DiscoveryError::Browse(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    let mut seen: Vec<Found> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left) {
            Ok(ServiceEvent::ServiceResolved(r)) => {
                let f = found(&r);
                let done = enough(&f);
                seen.retain(|s| s.name != f.name);
                seen.push(f);
                if done {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = daemon.stop_browse(crate::SERVICE_TYPE);
    let _ = daemon.shutdown();
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BaseInfo, Limits};

    #[test]
    fn txt_records_carry_every_base() {
        let info = Info {
            api: 1,
            name: "c".into(),
            version: "0".into(),
            bases: (0..5)
                .map(|i| BaseInfo {
                    identity: format!("{i:064x}"),
                    name: format!("b{i}"),
                    memory: 1,
                })
                .collect(),
            limits: Limits {
                max_sessions: 1,
                max_memory: 1,
                max_disk: 1,
            },
            active_sessions: 0,
        };
        let t: HashMap<String, String> = txt(&info).into_iter().collect();
        // "key=value" in one TXT string of at most 255 bytes.
        assert!(t.iter().all(|(k, v)| k.len() + v.len() < 255));
        assert_eq!(t["api"], "1");
        let bases = bases_of(|k| t.get(k).cloned());
        assert_eq!(
            bases,
            info.bases
                .iter()
                .map(|b| b.identity.clone())
                .collect::<Vec<_>>()
        );
    }
}
