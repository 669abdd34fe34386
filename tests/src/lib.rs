//! Parity and end-to-end tests live in `tests/tests/parity/` (one test binary).
