//! `tributary-sim`: simulated sensor fleets. The logic lives in the library.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "tributary-sim", version, about = "Simulated sensor fleets for Tributary")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the whole pipeline on loopback with embedded defaults (the README's first command).
    Demo,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo => {
            println!(
                "tributary demo (not wired up yet; tracked in the device simulator issue)\n\
                 \n\
                 When it lands, this command will start, all on 127.0.0.1 with no external services:\n\
                 - a simulated fleet of devices publishing temperature, humidity, pressure, vibration\n\
                   and energy readings over MQTT, plus one serial device on a pseudo-terminal;\n\
                 - tributary-agent with its embedded MQTT broker, reading both, pre-aggregating and\n\
                   buffering to disk;\n\
                 - tributary-collector on its embedded log and store, with the query API and the\n\
                   fleet dashboard;\n\
                 and print where to look and live counts until Ctrl-C stops everything."
            );
            Ok(())
        }
    }
}
