//! What the workload guest's disk exercise printed: the generation each
//! block holds once it is done.

use ferry_guest::GuestLine;

use super::Logged;

/// The generations of the guest's final `DISKGEN` lines, once `DISKEND`
/// came; None before, or when a block's line is not in `log` (a log that
/// lacks its first lines: the caller joins the logs).
pub fn final_gens(log: &[Logged]) -> Option<Vec<u32>> {
    let end = log
        .iter()
        .rposition(|l| matches!(l.line, GuestLine::DiskEnd { .. }))?;
    let GuestLine::DiskEnd { errors, blocks, .. } = log[end].line else {
        unreachable!()
    };
    assert_eq!(errors, 0, "the guest counted disk errors");
    let mut gens = vec![None; blocks as usize];
    for l in &log[..end] {
        if let GuestLine::DiskGen { first, gens: g } = &l.line {
            for (i, &x) in g.iter().enumerate() {
                if let Some(slot) = gens.get_mut(*first as usize + i) {
                    *slot = Some(x);
                }
            }
        }
    }
    gens.into_iter().collect()
}
