//! CTFE: the HTTP client the poller uses ([`client`]) and the wire types ([`wire`]).

pub mod client;
pub mod wire;

pub use client::{Client, Endpoint, Error};
