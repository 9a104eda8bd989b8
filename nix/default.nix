# runasroot for Nix: `buildImage` and `exportImage` with nixpkgs'
# dockerTools argument names, without nixpkgs (only builtins).
#
#   let rar = import ./nix { runasroot = ./target/release/runasroot; };
#   in rar.buildImage { name = "redis"; fromImage = base; runAsRoot = "..."; }
#
# `runasroot`: the program, as a path to the binary (copied into the store:
# the one file is all it needs) or a derivation with bin/runasroot.
# `qemu`: optional, a path to qemu-system-x86_64 or a derivation with
# bin/qemu-system-x86_64; by default runasroot looks in PATH and the usual
# places (/usr/bin, /run/current-system/sw/bin, ...). In a sandboxed build
# give it (and a runasroot built by Nix), as nothing outside the store is
# visible there.
#
# Each result is one file in the store, built by runasroot itself (no
# shell, no coreutils): the same inputs give the same bytes, so results are
# cache-friendly.
{ runasroot, qemu ? null }:

let
  inherit (builtins)
    attrNames concatLists concatStringsSep elem filter genList hasContext
    hashString isAttrs isList isPath isString length substring toFile toJSON
    typeOf unsafeDiscardStringContext;

  isDerivation = x: isAttrs x && (x.type or null) == "derivation";

  # A store path for a file input: derivations and strings with context as
  # they are; plain paths copied into the store (visible in a sandbox,
  # tracked as inputs).
  storePath = what: x:
    if isDerivation x || (isString x && hasContext x) then "${x}"
    else if isPath x || isString x then "${builtins.path { path = x; }}"
    else throw "runasroot: ${what} must be a path or a derivation, not ${typeOf x}";

  program =
    if isDerivation runasroot then "${runasroot}/bin/runasroot"
    else if isPath runasroot || isString runasroot then builtins.path { path = runasroot; name = "runasroot"; }
    else throw "runasroot: import ./nix { runasroot = ...; } needs the runasroot binary (a path) or a derivation with bin/runasroot";

  qemuArgs =
    if qemu == null then [ ]
    else if isDerivation qemu then [ "--qemu" "${qemu}/bin/qemu-system-x86_64" ]
    else [ "--qemu" (toString qemu) ];

  toLower = builtins.replaceStrings
    [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ]
    [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];

  # nixpkgs' compressor names → --compress-archive, and the file suffix.
  compressors = {
    none = { flag = "none"; ext = ""; };
    gz = { flag = "gzip"; ext = ".gz"; };
    zstd = { flag = "zstd"; ext = ".zst"; };
  };

  # fromImageName/fromImageTag → --from-image NAME[:TAG].
  selection = who: fromImageName: fromImageTag:
    if fromImageName == null && fromImageTag == null then [ ]
    else if fromImageName == null then
      throw "runasroot ${who}: fromImageTag = \"${fromImageTag}\" needs fromImageName too (runasroot selects NAME:TAG; give both)"
    else [ "--from-image" (fromImageName + (if fromImageTag == null then "" else ":${fromImageTag}")) ];

  # Throws for the first refused argument; `ok` otherwise.
  checked = who: refusals: ok:
    let hit = filter (r: r.when) refusals;
    in if hit == [ ] then ok
       else throw "runasroot ${who}: ${(builtins.head hit).arg} ${(builtins.head hit).why}";

in
rec {
  # nixpkgs' dockerTools.buildImage: one new layer (copyToRoot, then
  # runAsRoot as root inside the image), config merged over the base's.
  buildImage =
    args@{ name
    , tag ? null
    , fromImage ? null
    , fromImageName ? null
    , fromImageTag ? null
    , copyToRoot ? null
    , keepContentsDirlinks ? false
    , config ? null
    , architecture ? null
    , runAsRoot ? null
    , diskSize ? 1024
    , buildVMMemorySize ? 512
    , created ? "1970-01-01T00:00:01Z"
    , compressor ? "gz"
      # Ours: require the "kvm" system feature (set kvm = false to build
      # anywhere, under QEMU's software emulation where there is no KVM).
    , kvm ? true
      # nixpkgs arguments that have no meaning here; each is refused below.
    , extraCommands ? ""
    , uid ? 0
    , gid ? 0
    , includeNixDB ? false
    , contents ? null
    , includeStorePaths ? null
    , maxLayers ? null
    , fakeRootCommands ? null
    , enableFakechroot ? null
    }:
    let
      who = "buildImage ${name}";
      baseName = baseNameOf name;
      imageName = toLower name;
      compress = compressors.${compressor} or
        (throw "runasroot ${who}: compressor = \"${compressor}\"; it must be one of: ${concatStringsSep ", " (attrNames compressors)}");
      roots = map (storePath "copyToRoot") (
        if copyToRoot == null then [ ] else if isList copyToRoot then copyToRoot else [ copyToRoot ]);
      closureFiles = genList (i: "closure-${toString i}") (length roots);
      # The script runs with the image's own /bin/sh (not the build host's
      # store), stopping at the first failing command as nixpkgs' does.
      # Store paths in it or in config must be in the image (copyToRoot
      # brings its closure), so their Nix context is not needed here.
      script = toFile "${baseName}-run-as-root.sh"
        ("#!/bin/sh\nset -e\n" + unsafeDiscardStringContext runAsRoot + "\n");
      configFile = toFile "${baseName}-config.json" (unsafeDiscardStringContext (toJSON config));
      flags =
        [ "--base" (if fromImage == null then "scratch" else storePath "fromImage" fromImage) ]
        ++ selection who fromImageName fromImageTag
        ++ concatLists (map (r: [ "--copy-to-root" r ]) roots)
        ++ concatLists (map (f: [ "--copy-closure" f ]) closureFiles)
        ++ (if roots != [ ] && !keepContentsDirlinks then [ "--copy-dirlinks" ] else [ ])
        ++ (if runAsRoot == null then [ ] else [ "--script" script ])
        # Always a config (an empty one changes nothing), so that an image
        # with neither copyToRoot nor runAsRoot still gets its layer.
        ++ [ "--config" (if config == null then toFile "empty-config.json" "{}" else configFile) ]
        ++ [ "--created" created "--compress-archive" compress.flag ]
        ++ [ "--disk-size" (toString diskSize) "--memory" (toString buildVMMemorySize) ]
        ++ qemuArgs;
      # nixpkgs tags with its output hash when tag is null; the output path
      # is not known here, so the tag is a hash of everything the image is
      # made from instead (as unique, and known before the build).
      imageTag = if tag != null then tag
        else substring 0 32 (hashString "sha256" (unsafeDiscardStringContext (concatStringsSep "\n" (flags ++ [ imageName ]))));
      drv = derivation {
        name = "docker-image-${baseName}.tar${compress.ext}";
        system = "x86_64-linux";
        builder = program;
        args = flags ++ [ "--tag" "${imageName}:${imageTag}" "-o" (builtins.placeholder "out") ];
        exportReferencesGraph = concatLists (genList (i: [ (elem' closureFiles i) (elem' roots i) ]) (length roots));
        requiredSystemFeatures = if kvm then [ "kvm" ] else [ ];
        inherit imageName imageTag;
      };
      elem' = list: i: builtins.elemAt list i;
      arch = if architecture == null then "amd64" else architecture;
    in
    checked who [
      { when = !(elem arch [ "amd64" "x86_64" ]); arg = "architecture = \"${arch}\"";
        why = "is not supported: runasroot's guest is x86-64, so it builds amd64 images only"; }
      { when = extraCommands != "" && extraCommands != null; arg = "extraCommands";
        why = "is not supported: it ran outside the image as the build user; put those commands in runAsRoot, which runs inside the image as root"; }
      { when = uid != 0 || gid != 0; arg = "uid/gid";
        why = "are not supported: copyToRoot is copied owned by root; chown in runAsRoot instead (e.g. chown -R ${toString uid}:${toString gid} /path)"; }
      { when = includeNixDB; arg = "includeNixDB";
        why = "is not supported: runasroot does not write a Nix database into the image; run nix-store --load-db in runAsRoot if the image needs one"; }
      { when = contents != null; arg = "contents";
        why = "is deprecated in nixpkgs and not supported here: use copyToRoot"; }
      { when = includeStorePaths != null; arg = "includeStorePaths";
        why = "is a streamLayeredImage argument: buildImage always adds the store paths copyToRoot refers to (as nixpkgs' buildImage does); to add fewer, make copyToRoot refer to fewer paths"; }
      { when = maxLayers != null; arg = "maxLayers";
        why = "is a buildLayeredImage argument: buildImage adds exactly one layer; chain buildImage calls with fromImage for more"; }
      { when = fakeRootCommands != null || enableFakechroot != null; arg = "fakeRootCommands/enableFakechroot";
        why = "are buildLayeredImage arguments: use runAsRoot, which runs as real root inside the image"; }
    ] (drv // { buildArgs = args; });

  # nixpkgs' dockerTools.exportImage: the image's filesystem as one tar.
  # runasroot flattens on the host (no VM), so diskSize has nothing to
  # size and is accepted for compatibility only.
  exportImage =
    { fromImage
    , fromImageName ? null
    , fromImageTag ? null
    , diskSize ? 1024
    , name ? (if isDerivation fromImage then fromImage.name else baseNameOf (toString fromImage))
    }:
    derivation {
      inherit name;
      system = "x86_64-linux";
      builder = program;
      args = [ "export" "--base" (storePath "fromImage" fromImage) ]
        ++ selection "exportImage ${name}" fromImageName fromImageTag
        ++ [ "-o" (builtins.placeholder "out") ];
    };
}
