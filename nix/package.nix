# hypeman and its guest PID 1, hypeman-init.
#
# Two derivations from the one workspace (same source, same Cargo.lock):
#   - hypeman-init: built statically (glibc, +crt-static), because it is
#     copied into every guest's initrd and runs as PID 1 with no libc there;
#   - hypeman: the daemon and CLI, dynamically linked, wrapped so the tools
#     it runs at runtime are on PATH, with `bin/hypeman-init` next to it (the
#     daemon's default `[guest] init` is "hypeman-init next to the hypeman
#     executable"; through the wrapper that executable is bin/.hypeman-wrapped,
#     whose directory is still bin/).
#
# Why glibc and not pkgsStatic (musl) for the init: init/src/net.rs passes
# `libc::c_ulong` ioctl codes to `libc::ioctl`, whose request argument is a
# c_int on musl, so the crate does not compile for musl as written. The repo's
# own scripts (scripts/setup.sh) build it the same way: gnu target, crt-static.
#
# Tests are not run here (doCheck = false): the suite needs /dev/kvm, a local
# OCI registry, QEMU and a guest kernel (HYPEMAN_REAL_VM, scripts/test.sh);
# inside the Nix sandbox none of that exists, and the parts that do not need
# them run in CI through `scripts/test.sh`. The NixOS VM tests in vm-tests/
# exercise the built package end to end instead.
{
  lib,
  stdenv,
  rustPlatform,
  makeWrapper,
  glibc,
  qemu_kvm,
  erofs-utils,
  e2fsprogs,
  cloud-hypervisor,
  # Cloud Hypervisor is on PATH where nixpkgs builds it, so the daemon's
  # default hypervisor is "cloud-hypervisor" there (the settings' probe), and
  # QEMU otherwise.
  withCloudHypervisor ? lib.meta.availableOn stdenv.hostPlatform cloud-hypervisor,
}:

let
  manifest = (lib.importTOML ../Cargo.toml).package;

  # Only what cargo needs: a change to the docs, the Nix files or the CI
  # scripts does not rebuild the binaries. `benches/` must be there because
  # Cargo.toml declares a [[bench]] target; `tools/` holds a workspace member
  # (the fake Cloud Hypervisor the tests use), without which cargo cannot
  # load the workspace; `tests/` and `examples/` keep `doCheck = true`
  # possible for whoever overrides it.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../contract
      ../init
      ../benches
      ../tools
      ../tests
      ../examples
    ];
  };

  common = {
    inherit (manifest) version;
    inherit src;
    cargoLock.lockFile = ../Cargo.lock;
    doCheck = false;
  };

  hypeman-init = rustPlatform.buildRustPackage (
    common
    // {
      pname = "hypeman-init";
      cargoBuildFlags = [
        "--package"
        "hypeman-init"
      ];
      # nixpkgs' cargo build hook always passes `--target`, so these flags
      # reach only the target's crates, not build scripts or proc macros.
      # relocation-model=static makes a plain static executable rather than a
      # static-pie (no rcrt1.o, no dynamic-linker entry from the ld wrapper).
      RUSTFLAGS = "-C target-feature=+crt-static -C relocation-model=static";
      buildInputs = [ glibc.static ];
      hardeningDisable = [ "pie" ];

      # Fail the build, not a guest boot, if the binary came out dynamic.
      postInstall = ''
        if ''${READELF:-readelf} -l "$out/bin/hypeman-init" | grep -q 'INTERP'; then
          echo "hypeman-init is dynamically linked; it must be static" >&2
          exit 1
        fi
      '';

      meta = {
        description = "hypeman's guest PID 1 (static)";
        license = lib.licenses.asl20;
        platforms = lib.platforms.linux;
        mainProgram = "hypeman-init";
      };
    }
  );

  runtimeTools = [
    qemu_kvm # qemu-system-<host arch>
    erofs-utils # mkfs.erofs, fsck.erofs
    e2fsprogs # mkfs.ext4; e2fsck and resize2fs to grow an overlay
  ] ++ lib.optional withCloudHypervisor cloud-hypervisor;
in
rustPlatform.buildRustPackage (
  common
  // {
    pname = "hypeman";
    cargoBuildFlags = [
      "--package"
      "hypeman"
    ];

    nativeBuildInputs = [ makeWrapper ];

    postInstall = ''
      ln -s ${hypeman-init}/bin/hypeman-init $out/bin/hypeman-init
      wrapProgram $out/bin/hypeman --prefix PATH : ${lib.makeBinPath runtimeTools}
    '';

    passthru = {
      inherit hypeman-init runtimeTools;
    };

    meta = {
      description = "Declarative microVM manager: TOML declarations converged onto Cloud Hypervisor or QEMU";
      license = lib.licenses.asl20;
      platforms = lib.platforms.linux;
      mainProgram = "hypeman";
    };
  }
)
