//! Integration tests: the real daemon against the development CTFE on 127.0.0.1, real
//! recorder master scripts, real files and processes. One test binary, one module per
//! behaviour.

mod common;

mod cli;
mod faults;
mod fixtures;
mod gce;
mod operations;
