pub mod blk;
pub mod ctl;
pub mod diff;
pub mod fs;
pub mod image;

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
