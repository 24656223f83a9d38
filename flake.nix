{
  description = "hypeman: a declarative microVM manager (Cloud Hypervisor / QEMU), with a NixOS module";

  # nixos-unstable: the crates in Cargo.lock (lockfile v4) and `rust-version =
  # 1.85` need a recent rustc; a stable branch from before 25.05 is too old.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      # No flake-utils: two systems and one helper.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      # System-independent outputs live outside the per-system attrsets: a
      # module or overlay under packages.<system> is not found by NixOS.
      overlays.default = final: _prev: {
        hypeman = final.callPackage ./nix/package.nix { };
      };

      nixosModules.default = import ./nixos-module;
      nixosModules.hypeman = self.nixosModules.default;

      packages = forAllSystems (
        pkgs:
        let
          hypeman = pkgs.callPackage ./nix/package.nix { };
        in
        {
          default = hypeman;
          inherit hypeman;
          # The static guest PID 1 alone (the default package has it too, as
          # bin/hypeman-init next to bin/hypeman).
          hypeman-init = hypeman.hypeman-init;
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.default ];
          packages =
            with pkgs;
            [
              clippy
              rustfmt
              rust-analyzer
              # What the daemon and scripts/test.sh run.
              qemu_kvm
              erofs-utils
              e2fsprogs
              skopeo
              umoci
              cpio
              kmod
              nix # nix-instantiate for .ci/nix-parse-check.sh
            ]
            ++ lib.optional (lib.meta.availableOn pkgs.stdenv.hostPlatform cloud-hypervisor) cloud-hypervisor;
        };
      });

      checks = forAllSystems (
        pkgs:
        let
          hypeman = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          buildConfigDir = pkgs.callPackage ./nix/config-dir.nix { };
          exampleInstances = lib.mapAttrs' (
            file: _:
            lib.nameValuePair (lib.removeSuffix ".toml" file) (
              builtins.fromTOML (builtins.readFile (./examples/instances + "/${file}"))
            )
          ) (lib.filterAttrs (f: _: lib.hasSuffix ".toml" f) (builtins.readDir ./examples/instances));
        in
        {
          package = hypeman;
          hypeman-init = hypeman.hypeman-init;

          # The module's build-time validation, without a VM: every example
          # declaration and the example settings, rendered by pkgs.formats.toml
          # (as the module renders them) and accepted by `hypeman validate`.
          config-examples-validate = buildConfigDir {
            package = hypeman;
            name = "hypeman-config-examples";
            settings = builtins.fromTOML (builtins.readFile ./examples/hypeman.toml);
            instances = exampleInstances;
          };

          # ... and a bad declaration fails the build, naming the file.
          config-invalid-fails-build =
            pkgs.runCommand "hypeman-config-invalid-fails-build"
              {
                failed = pkgs.testers.testBuildFailure (buildConfigDir {
                  package = hypeman;
                  name = "hypeman-config-invalid";
                  instances.bad = {
                    image = "docker.io/library/busybox:latest";
                    memory = "512MB"; # decimal units are refused
                  };
                });
              }
              ''
                cat $failed/testBuildFailure.log
                grep -q 'instances/bad.toml:' $failed/testBuildFailure.log
                touch $out
              '';
        }
        // import ./vm-tests {
          inherit pkgs;
          package = hypeman;
        }
      );
    };
}
