//! `tributary-collector`: command-line entry point. The logic lives in the library.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "tributary-collector", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    eprintln!("tributary-collector: not implemented yet; see the open issues");
    std::process::exit(2);
}
