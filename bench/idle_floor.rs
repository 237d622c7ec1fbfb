//! The idle benchmark's reference: the least a poller can do every interval — sleep to the
//! next tick, send `GET /_/get_oldest_pending_task` on a kept-alive connection, read the
//! answer — with std only, one thread, blocking I/O. bench/run.py compiles it with
//! `rustc -O` (when rustc is on PATH) and measures it beside the daemon, in the same run.
//!
//! Usage: idle_floor HOST:PORT INTERVAL_MS (runs until killed)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().expect("HOST:PORT");
    let interval = Duration::from_millis(args.next().expect("INTERVAL_MS").parse().expect("ms"));
    let stream = TcpStream::connect(&addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let request = format!("GET /_/get_oldest_pending_task HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut next = Instant::now();
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        writer.write_all(request.as_bytes()).expect("send");
        let mut length = 0usize;
        loop {
            line.clear();
            reader.read_line(&mut line).expect("receive");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("content-length:") {
                length = value.trim().parse().expect("content-length");
            }
        }
        body.resize(length, 0);
        reader.read_exact(&mut body).expect("body");
    }
}
