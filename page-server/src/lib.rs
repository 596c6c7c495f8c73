//! Ferry's migration wire protocol ([`protocol`]) and the source-side page
//! server ([`server`]) that answers demand faults and pushes every other page.

pub mod protocol;
