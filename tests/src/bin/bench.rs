//! `bench NAME [--quick]`: runs a benchmark and prints one JSON object per line.
//! The benches themselves live in `tributary_tests::bench`, one module each.

use clap::Parser;
use tributary_tests::bench::{self, BenchOptions, BENCH_NAMES};

#[derive(Debug, Parser)]
#[command(about = "Tributary benchmarks; prints one JSON object per line")]
struct Arguments {
    /// Which bench to run (codec), or `all`.
    name: String,
    /// Smaller workload that finishes within 60 s in a release build.
    #[arg(long)]
    quick: bool,
    /// Codec experiments: zstd level to use instead of the default.
    #[arg(long)]
    zstd_level: Option<i32>,
}

fn main() -> anyhow::Result<()> {
    let arguments = Arguments::parse();
    let options = BenchOptions {
        quick: arguments.quick,
        zstd_level: arguments.zstd_level,
    };
    let names: Vec<&str> = if arguments.name == "all" {
        BENCH_NAMES.to_vec()
    } else {
        vec![arguments.name.as_str()]
    };
    for name in names {
        for line in bench::run(name, &options)? {
            println!("{line}");
        }
    }
    Ok(())
}
