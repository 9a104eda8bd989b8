//! `runasroot`: parse the arguments, run, print the error (through
//! [`runasroot::report`], the one renderer), exit as `docker run` does.

use std::process::ExitCode;

use clap::Parser;
use runasroot::run::{self, Ended};

/// What `runasroot` alone prints: the two forms and where the rest is.
const NO_ARGUMENTS: &str = concat!(
    "runasroot: run a root script over a container image inside a microVM\n",
    "usage: runasroot --base IMAGE --script FILE -o NEW.tar\n",
    "       runasroot export --base IMAGE -o ROOTFS.tar\n",
    "see `runasroot --help` for every option",
);

/// Installing the SIGINT/SIGTERM handlers failed (before any work).
#[derive(Debug, thiserror::Error)]
#[error("cannot install the SIGINT/SIGTERM handlers")]
struct SignalHandlers(#[source] std::io::Error);

fn main() -> ExitCode {
    if std::env::args_os().len() <= 1 {
        eprintln!("{NO_ARGUMENTS}");
        return ExitCode::from(run::EXIT_FAILED);
    }
    // A usage error is runasroot failing, so 125 as for any other failure
    // (clap's own default is 2, which a script could have returned).
    let cli = match runasroot::cli::Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version as clap prints them; a usage error (which
        // quotes the arguments given) escaped like every other error.
        Err(e) if e.use_stderr() => {
            eprint!("{}", runasroot::report::escape_lines(&e.render().to_string()));
            return ExitCode::from(run::EXIT_FAILED);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let stop = match runasroot::interrupt::install() {
        Ok(stop) => stop,
        Err(e) => {
            eprint!("{}", runasroot::report::render(&SignalHandlers(e), None, None));
            return ExitCode::from(run::EXIT_FAILED);
        }
    };
    match run::main(cli, stop) {
        Ok(Ended::Done) => ExitCode::SUCCESS,
        Ok(Ended::ScriptFailed(code)) => {
            eprintln!("runasroot: the script exited with status {code}; nothing was written");
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Err((err, _ui)) => {
            eprint!("{}", runasroot::report::render(&err, err.fix().as_deref(), err.context()));
            ExitCode::from(err.exit_code())
        }
    }
}
