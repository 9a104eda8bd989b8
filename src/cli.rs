//! Command-line definitions only; `main` turns them into plain option
//! structs for [`crate::run`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Run a root script over a container image inside a microVM and hand back
/// the new layer (or the flattened filesystem). No root, no Docker daemon.
#[derive(Debug, Parser)]
#[command(name = "runasroot", version, args_conflicts_with_subcommands = true)]
#[command(after_help = "Examples:\n  runasroot --base img.tar --script setup.sh -o new.tar\n  runasroot --base scratch --copy-to-root root/ --config config.json -o new.tar\n  runasroot export --base img.tar -o rootfs.tar\n\n\
Exit status: the script's own code when it ran; 125 when runasroot failed; 124 when --timeout expired; 130 on SIGINT (Ctrl-C); 143 on SIGTERM.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Flatten an image into one rootfs tar (optionally after a script).
    Export(ExportArgs),
}

/// `runasroot --base … --script … -o …`: the runAsRoot job.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub input: InputArgs,

    /// The script to run as root inside the image (a shebang picks the
    /// interpreter; otherwise /bin/sh). May be left out when --copy-to-root,
    /// --copy-closure or --config is given: the new layer then holds what
    /// they add.
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,

    /// The new image's container config: a JSON object of Cmd, Entrypoint,
    /// Env, WorkingDir, ExposedPorts, Volumes, Labels, User, StopSignal,
    /// Healthcheck, OnBuild, Shell, ArgsEscaped, merged over the base's
    /// (a given key replaces the base's, null removes it, Env merges by
    /// name). The script's environment is not changed by it (use --env).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Write the complete new image here (`-` for stdout).
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    pub output: Option<String>,

    /// Also (or only) write the bare new layer tar here (`-` for stdout).
    #[arg(long, value_name = "PATH")]
    pub layer_output: Option<String>,

    /// Format of the image written with -o.
    #[arg(long, value_enum, default_value_t = Format::DockerArchive)]
    pub format: Format,

    /// Name the new image NAME:TAG.
    #[arg(long, value_name = "NAME:TAG")]
    pub tag: Option<String>,

    /// Compression of the new layer inside the image.
    #[arg(long, value_enum, default_value_t = Compress::None)]
    pub compress: Compress,

    /// Compress the whole archive written with -o (as nixpkgs' buildImage
    /// `compressor` does); docker load, podman load and skopeo read it.
    #[arg(long, value_enum, default_value_t = Compress::None)]
    pub compress_archive: Compress,

    /// The image's creation time: RFC 3339 or `now`
    /// [default: SOURCE_DATE_EPOCH, else 1970-01-01T00:00:01Z].
    #[arg(long, value_name = "TIME")]
    pub created: Option<String>,

    #[command(flatten)]
    pub script_env: ScriptArgs,

    #[command(flatten)]
    pub vm: VmArgs,

    #[command(flatten)]
    pub ui: UiArgs,
}

/// `runasroot export …`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub input: InputArgs,

    /// Write the rootfs tar here (`-` for stdout).
    #[arg(short = 'o', long = "output", value_name = "PATH", required = true)]
    pub output: String,

    /// Flatten inside the VM (the merged overlay view) instead of with the
    /// host streaming engine. Implied by --script.
    #[arg(long)]
    pub in_vm: bool,

    /// Run this script as root first, then export the result (through the VM).
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,

    #[command(flatten)]
    pub script_env: ScriptArgs,

    #[command(flatten)]
    pub vm: VmArgs,

    #[command(flatten)]
    pub ui: UiArgs,
}

/// Which base image.
#[derive(Debug, Args)]
pub struct InputArgs {
    /// The base image: a docker-archive, an OCI layout directory or an OCI
    /// archive (also `docker-archive:PATH`, `oci:DIR[:REF]`, `oci-archive:PATH[:REF]`),
    /// or `scratch` to start from nothing (no layers; a file named scratch is `./scratch`).
    #[arg(long, value_name = "IMAGE")]
    pub base: Option<String>,

    /// Select NAME:TAG in an archive holding several images [default: the first].
    #[arg(long, value_name = "NAME:TAG")]
    pub from_image: Option<String>,

    /// Platform to pick from a multi-platform OCI index.
    #[arg(long, value_name = "OS/ARCH", default_value = "linux/amd64")]
    pub platform: String,

    /// Do not keep decompressed layers in the cache (~/.cache/runasroot,
    /// or $RUNASROOT_CACHE); decompress them into TMPDIR for this run only.
    #[arg(long)]
    pub no_cache: bool,
}

/// What the script gets.
#[derive(Debug, Args)]
pub struct ScriptArgs {
    /// Set KEY=VALUE in the script's environment (repeatable; overrides the image's Env).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Copy a directory's contents or a tar's entries into the new layer
    /// before the script runs (repeatable; like nixpkgs' copyToRoot).
    #[arg(long = "copy-to-root", value_name = "PATH")]
    pub copy_to_root: Vec<PathBuf>,

    /// In --copy-to-root directories, copy a symlink to a directory as the
    /// directory it points to (rsync -k; nixpkgs' copyToRoot does this
    /// unless keepContentsDirlinks), so a buildEnv's `bin -> /nix/store/…`
    /// becomes a real /bin.
    #[arg(long)]
    pub copy_dirlinks: bool,

    /// Copy into the new layer, at their own paths, the Nix store paths
    /// that the roots listed in FILE refer to: FILE is what Nix writes for
    /// `exportReferencesGraph` (repeatable). This is what nixpkgs' buildImage
    /// adds so that copyToRoot's symlinks into /nix/store resolve.
    #[arg(long = "copy-closure", value_name = "FILE")]
    pub copy_closure: Vec<PathBuf>,
}

/// The VM's limits and launcher.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 512)]
    pub memory: u64,

    /// Scratch space in MiB for the new layer: what the script writes (the
    /// base is read in place and does not count). Swap-backed, lazily
    /// allocated on the host.
    #[arg(long, value_name = "MiB", default_value_t = 1024)]
    pub disk_size: u64,

    /// Virtual CPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,

    /// Stop the run after this long, counted from its start (reading the base, preparing it, the guest, writing; e.g. `90`, `90s`, `5m`); exit status 124.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,

    /// The launcher: the built-in VMM (needs hardware KVM) or QEMU.
    #[arg(long, value_enum, default_value_t = Vmm::Auto)]
    pub vmm: Vmm,

    /// Use this kernel (bzImage or vmlinux) instead of the embedded one.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Use this initramfs instead of the embedded one.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// The QEMU to run (a path, or a name looked up like the default)
    /// [default: $RUNASROOT_QEMU, else qemu-system-x86_64 in PATH, else in
    /// /usr/local/bin, /usr/bin, /bin and the Nix profiles].
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
}

/// Output on the terminal.
#[derive(Debug, Args, Clone, Copy)]
pub struct UiArgs {
    /// Show the guest's kernel log and runasroot's own diagnostics.
    #[arg(short, long, conflicts_with = "quiet")]
    pub verbose: bool,

    /// No progress display.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    DockerArchive,
    Oci,
    OciArchive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compress {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Vmm {
    Auto,
    Builtin,
    Qemu,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_image_builder_flags() {
        let cli = Cli::try_parse_from([
            "runasroot", "--base", "scratch", "--copy-to-root", "root", "--config", "c.json", "--compress-archive", "gzip",
            "--qemu", "/opt/qemu", "-o", "o.tar.gz",
        ])
        .unwrap();
        assert_eq!(cli.run.input.base.as_deref(), Some("scratch"));
        assert_eq!(cli.run.script, None);
        assert_eq!(cli.run.config.as_deref(), Some(std::path::Path::new("c.json")));
        assert_eq!(cli.run.compress_archive, Compress::Gzip);
        assert_eq!(cli.run.compress, Compress::None);
        assert_eq!(cli.run.vm.qemu.as_deref(), Some(std::path::Path::new("/opt/qemu")));
        let cli = Cli::try_parse_from(["runasroot", "export", "--base", "b.tar", "-o", "x", "--in-vm", "--qemu", "q"]).unwrap();
        let Some(Command::Export(e)) = cli.command else { panic!() };
        assert_eq!(e.vm.qemu.as_deref(), Some(std::path::Path::new("q")));
    }

    #[test]
    fn parses_run_and_export() {
        let cli = Cli::try_parse_from(["runasroot", "--base", "b.tar", "--script", "s.sh", "-o", "o.tar", "--env", "A=1", "--env", "B=2"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.input.base.as_deref(), Some("b.tar"));
        assert_eq!(cli.run.script_env.env, vec!["A=1", "B=2"]);
        assert_eq!(cli.run.vm.memory, 512);
        assert_eq!(cli.run.vm.disk_size, 1024);

        let cli = Cli::try_parse_from(["runasroot", "export", "--base", "b.tar", "-o", "-", "--in-vm"]).unwrap();
        match cli.command {
            Some(Command::Export(e)) => {
                assert!(e.in_vm);
                assert_eq!(e.output, "-");
            }
            other => panic!("{other:?}"),
        }
    }
}
