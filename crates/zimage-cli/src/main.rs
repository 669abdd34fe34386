//! `zimage`: generate images with Z-Image.

mod backend;
mod bench;
mod generate;
mod output;
mod progress;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "zimage",
    version,
    about = "Z-Image text-to-image on CUDA, wgpu (Vulkan/Metal) or the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt (optionally from an input image and a mask).
    Generate(generate::GenerateArgs),
    /// Serve the model over HTTP: OpenAI Images, A1111 and native job APIs, and a web page.
    Serve(serve::ServeArgs),
    /// Time the model's stages on random weights (nothing to download).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line names the argument and the problem.
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("invalid arguments"));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain as "what failed: why"; multi-line reports (every mismatched tensor of a
            // checkpoint) keep their lines.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
