//! Drain, timeouts, process groups, bounded output, capacity, the status page.
