//! Source-side page server (skeleton).
