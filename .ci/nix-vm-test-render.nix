# Renders a NixOS VM test's testScript, and the commands of the instances
# its machine declares, with a stub nixpkgs, so .ci/nix-parse-check.sh can
# syntax-check them (python3, sh -n) without nixpkgs. Nothing runs here.
{ file, hypervisor }:
let
  lib = rec {
    concatStringsSep = builtins.concatStringsSep;
    optionalAttrs = c: a: if c then a else { };
    nameValuePair = name: value: { inherit name value; };
    mapAttrs' = f: set: builtins.listToAttrs (map (n: f n set.${n}) (builtins.attrNames set));
    mkForce = v: v;
  };
  drv = name: "/nix/store/00000000000000000000000000000000-${name}";
  pkgs = {
    inherit lib;
    dockerTools.buildLayeredImage = a: drv a.name;
    runCommand = name: _: _: drv name;
    writeText = name: _: drv name;
    busybox = drv "busybox";
    python3 = drv "python3";
    curl = drv "curl";
    skopeo = drv "skopeo";
    linuxPackages.kernel = drv "linux";
  };
  test = import file { inherit pkgs hypervisor; };
  nodes = {
    machine = {
      system.build.toplevel = drv "nixos-system-machine";
      networking.primaryIPAddress = "192.168.1.2";
    };
    outside.networking.primaryIPAddress = "192.168.1.1";
  };
  machineCfg = test.nodes.machine { inherit lib nodes; };
in
{
  script = test.testScript { inherit nodes; };
  cmds = map (i: builtins.elemAt i.cmd 2) (
    builtins.filter (i: i ? cmd) (builtins.attrValues (machineCfg.services.hypeman.instances or { }))
  );
}
