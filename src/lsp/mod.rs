//! The LSP surface (to be written).
pub fn serve() -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
