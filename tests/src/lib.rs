//! Placeholder; replaced by the test harness.
