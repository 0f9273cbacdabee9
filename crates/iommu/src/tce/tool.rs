//! The client side of the `table` query: a tool maps the table's file the VMM handed
//! out (read-only) and lists its valid entries, as `passthru ctl PATH frontend tce
//! table LIOBN` does.

use crate::frontend::Tool;
use serde_json::{Value, json};

/// How to walk a table's file (the `table` answer's `layout`).
pub const LAYOUT: &str = "abi::tce::layout: the root page at offset 0; an inner entry is the file offset of the next level's page | READ | WRITE (0: none); a leaf entry is the TCE; 4 KiB pages of 512 little-endian words";

/// The `table` query's tool.
pub const TABLE: Tool = Tool { query: "table", render };

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Adds `entries` ([index, IOBA, TCE], at most `max`) read through a read-only mapping
/// of the file, and says it for a human.
fn render(v: &Value, files: &[std::fs::File], max: usize) -> Result<(Value, String), String> {
    let file = files.first().ok_or("the VMM passed no file with its answer")?;
    let bits = u32::try_from(num(v, "entry_bits")).map_err(|_| "a malformed answer")?;
    let shift = num(v, "page_shift");
    let bus =
        v["bus_offset"].as_str().and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()).unwrap_or(0);
    let entries = super::table::mapped_entries(file, bits, max).map_err(|e| e.to_string())?;
    let mut out = v.clone();
    out["entries"] = entries
        .iter()
        .map(|&(i, tce)| json!([i, format!("{:#x}", bus.saturating_add(i << shift.min(63))), format!("{tce:#x}")]))
        .collect();
    let mut text = format!(
        "liobn {:#x}, group {}, bus offset {}, 2^{} entries of 2^{}-byte pages, {} levels\n",
        num(v, "liobn"),
        num(v, "group"),
        v["bus_offset"].as_str().unwrap_or("-"),
        bits,
        shift,
        num(v, "levels")
    );
    text += &format!("{} valid entries (index, IOBA, TCE):\n", entries.len());
    for (i, tce) in entries {
        text += &format!("  {:>8} {:>18} {tce:#x}\n", i, format!("{:#x}", bus.saturating_add(i << shift.min(63))));
    }
    Ok((out, text))
}
