use clap::Parser;

fn main() -> anyhow::Result<()> {
    let _cli = inferwatch::cli::Cli::parse();
    Ok(())
}
