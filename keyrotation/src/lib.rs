//! Placeholder; replaced by the key ring implementation.
