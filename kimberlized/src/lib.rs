//! `kimberlized`, the cloudlet daemon (docs/CLOUDLET.md, "The cloudlet
//! daemon"), and the client side of its API that `kimberlize offload`
//! uses: mutual TLS, a small HTTP/1.1 layer, synthesis sessions, DNS-SD.

pub mod api;
pub mod cli;
pub mod client;
pub mod discovery;
pub mod http;
pub mod log;
pub mod server;
pub mod session;
pub mod tls;

/// The API version this build speaks (the `/v1/` of every path, `api` in
/// `GET /v1/info` and in the DNS-SD TXT record).
pub const API_VERSION: u32 = 1;

/// The DNS-SD service type cloudlets advertise.
pub const SERVICE_TYPE: &str = "_kimberley._tcp.local.";
