# The host side of guest networking (nixos-module/network.nix), evaluated
# with builtins only: the module is called with a stub `lib` (just the
# functions it uses; `mkIf` kept as a marker and resolved here) and a
# hand-built `config`, as NixOS would pass them once the options are merged.
# Evaluates to true, or throws naming every check that failed.
# Used by .ci/nix-parse-check.sh; nixpkgs is not needed.
let
  net = import ../nix/network.nix;

  stubLib = rec {
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = what: mkOption {
      default = false;
      description = "Whether to enable ${what}.";
    };
    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    literalMD = text: {
      _type = "literalMD";
      inherit text;
    };
    types = {
      str = "str";
      bool = "bool";
      port = "port";
      listOf = t: "list of ${t}";
      nullOr = t: "null or ${t}";
    };
    inherit (builtins) attrNames;
    filterAttrs =
      pred: set:
      builtins.listToAttrs (
        builtins.concatMap (
          name:
          if pred name set.${name} then
            [
              {
                inherit name;
                value = set.${name};
              }
            ]
          else
            [ ]
        ) (builtins.attrNames set)
      );
    optional = cond: x: if cond then [ x ] else [ ];
  };

  # mkIf as the module system applies it: a false condition defines nothing
  # (the attrsets around it stay, empty, as the merged options would).
  isIf = v: builtins.isAttrs v && (v._type or null) == "if";
  resolve =
    v:
    if isIf v then
      (if v.condition then resolve v.content else null)
    else if builtins.isAttrs v then
      builtins.listToAttrs (
        builtins.concatMap (
          name:
          let
            r = resolve v.${name};
          in
          if isIf v.${name} && r == null then
            [ ]
          else
            [
              {
                inherit name;
                value = r;
              }
            ]
        ) (builtins.attrNames v)
      )
    else if builtins.isList v then
      map resolve v
    else
      v;

  # What the merged options would hold: the defaults, overridden by `set`.
  networkOptions =
    set:
    let
      n = set.network or { };
      subnet = n.subnet or "10.100.0.0/16";
    in
    {
      bridge = n.bridge or "hypeman0";
      inherit subnet;
      dns = n.dns or [ ];
      gateway = net.gateway subnet;
      nat = {
        enable = false;
        externalInterface = null;
      }
      // (n.nat or { });
      firewall = {
        trusted = false;
        allowedTCPPorts = [ ];
        allowedUDPPorts = [ ];
      }
      // (n.firewall or { });
    };

  evalWith =
    set:
    let
      hypeman = {
        enable = true;
        network = networkOptions set;
        instances = set.instances or { };
        # As merged: the module's own `network` table, unless forced away.
        settings = set.settings or {
          network = net.settingsTable { inherit (networkOptions set) bridge subnet dns; };
        };
      };
      config = {
        services.hypeman = hypeman;
        networking = {
          nat.externalInterface = set.natExternalInterface or null;
          firewall = {
            enable = true;
            filterForward = set.filterForward or false;
          };
          networkmanager.enable = set.networkmanager or false;
        };
        systemd.network.enable = set.networkd or false;
      };
      module = import ../nixos-module/network.nix {
        inherit config;
        lib = stubLib;
      };
    in
    {
      inherit module;
      out = resolve module.config;
    };

  failedMessages = e: map (a: a.message) (builtins.filter (a: !a.assertion) e.out.assertions);
  failsWith =
    e: needle:
    builtins.any (m: builtins.match ".*${needle}.*" (builtins.replaceStrings [ "\n" ] [ " " ] m) != null) (
      failedMessages e
    );

  networked = {
    web = {
      image = "x";
      network = {
        enabled = true;
      };
    };
    batch = {
      image = "y";
      network = null;
    };
  };

  # The VM test's configuration (vm-tests/network-scenario.nix).
  full = evalWith {
    network = {
      bridge = "vmbr0";
      subnet = "10.77.0.0/24";
      dns = [ "10.77.0.1" ];
      nat = {
        enable = true;
        externalInterface = "eth1";
      };
      firewall.allowedTCPPorts = [ 8081 ];
      firewall.allowedUDPPorts = [ 53 ];
    };
    instances = networked;
    networkmanager = true;
    networkd = true;
    filterForward = true;
  };

  plain = evalWith { };

  checks = {
    "option defaults are the daemon's (src/settings.rs)" =
      let
        o = plain.module.options.services.hypeman.network;
        rust = builtins.readFile ../src/settings.rs;
        rustBridge = builtins.elemAt (builtins.elemAt (builtins.split "const DEFAULT_BRIDGE: &str = \"([^\"]+)\";" rust) 1) 0;
      in
      o.bridge.default == rustBridge
      && o.subnet.default == "10.100.0.0/16"
      && o.dns.default == [ ]
      && o.gateway.default == "10.100.0.1"
      && o.gateway.readOnly
      && !o.nat.enable.default
      && o.nat.externalInterface.default == null
      && !o.firewall.trusted.default;

    "the options become the settings' [network] table" =
      full.out.services.hypeman.settings.network == {
        bridge = "vmbr0";
        subnet = "10.77.0.0/24";
        dns = [ "10.77.0.1" ];
      }
      && plain.out.services.hypeman.settings.network == {
        bridge = "hypeman0";
        subnet = "10.100.0.0/16";
        dns = [ ];
      };

    "a good configuration passes every assertion, with no warning" =
      failedMessages full == [ ] && failedMessages plain == [ ] && full.out.warnings == [ ];

    "nat.enable: networking.nat on the bridge, to the uplink" =
      full.out.networking.nat == {
        enable = true;
        internalInterfaces = [ "vmbr0" ];
        externalInterface = "eth1";
      }
      && !(plain.out.networking ? nat);

    "nat.enable with forward filtering: a forward rule for the guests" =
      full.out.networking.firewall.extraForwardRules == ''
        iifname "vmbr0" oifname "eth1" accept
      ''
      && !(plain.out.networking.firewall ? extraForwardRules);

    "nat.enable without an uplink fails, naming the options" = failsWith (evalWith {
      network.nat.enable = true;
    }) "set services.hypeman.network.nat.externalInterface";

    "nat.enable with networking.nat.externalInterface set is enough" =
      let
        e = evalWith {
          network.nat.enable = true;
          natExternalInterface = "enp1s0";
        };
      in
      failedMessages e == [ ]
      && !(e.out.networking.nat ? externalInterface)
      && e.out.networking.nat.internalInterfaces == [ "hypeman0" ];

    "the bridge as the NAT uplink fails" = failsWith (evalWith {
      network.nat = {
        enable = true;
        externalInterface = "hypeman0";
      };
    }) "the guests' own bridge";

    "the firewall: closed by default, ports opened on the bridge only, or trusted" =
      full.out.networking.firewall.interfaces == {
        vmbr0 = {
          allowedTCPPorts = [ 8081 ];
          allowedUDPPorts = [ 53 ];
        };
      }
      && !(full.out.networking.firewall ? trustedInterfaces)
      && plain.out.networking.firewall.interfaces == { }
      && (evalWith { network.firewall.trusted = true; }).out.networking.firewall.trustedInterfaces == [
        "hypeman0"
      ];

    "dns on the gateway with port 53 closed warns" =
      let
        e = evalWith { network.dns = [ "10.100.0.1" ]; };
      in
      builtins.length e.out.warnings == 1
      && builtins.match ".*UDP port 53.*" (builtins.head e.out.warnings) != null
      && (evalWith {
        network.dns = [ "10.100.0.1" ];
        network.firewall.trusted = true;
      }).out.warnings == [ ];

    "NetworkManager and networkd leave the bridge and the TAPs alone, when they run" =
      full.out.networking.networkmanager.unmanaged == [
        "interface-name:vmbr0"
        "interface-name:hm*"
      ]
      && full.out.systemd.network.networks."05-hypeman" == {
        matchConfig.Name = "vmbr0 hm*";
        linkConfig.Unmanaged = true;
      }
      && !(plain.out.networking.networkmanager ? unmanaged)
      && plain.out.systemd.network.networks == { }
      && plain.out.networking.dhcpcd.denyInterfaces == [
        "hypeman0"
        "hm*"
      ];

    "tun and bridge are loaded when an instance is networked" =
      full.out.boot.kernelModules == [
        "tun"
        "bridge"
      ]
      && !(plain.out.boot ? kernelModules)
      && !((evalWith { instances.batch = networked.batch; }).out.boot ? kernelModules);

    "a bad bridge name fails, with the daemon's reason" =
      failsWith (evalWith { network.bridge = "hmbr0"; }) "must not start with \"hm\""
      && failsWith (evalWith { network.bridge = "a-bridge-name-too-long"; }) "1 to 15 characters";

    "a bad subnet fails, with the daemon's reason" =
      failsWith (evalWith { network.subnet = "10.100.0.1/16"; }) "write 10.100.0.0/16"
      && failsWith (evalWith { network.subnet = "10.100.0.0/31"; }) "between 8 and 30, not 31";

    "a settings.network value forced past the options fails" =
      failsWith (evalWith {
        settings.network = {
          bridge = "br0";
          subnet = "10.100.0.0/16";
        };
      }) "overrides services.hypeman.network.bridge"
      && failsWith (evalWith {
        settings.network = {
          bridge = "hypeman0";
          subnet = "10.9.0.0/16";
        };
      }) "overrides services.hypeman.network.subnet";

    "nothing is configured when hypeman is disabled" =
      let
        disabled = import ../nixos-module/network.nix {
          lib = stubLib;
          config = {
            services.hypeman = {
              enable = false;
              network = networkOptions { };
            };
          };
        };
      in
      resolve disabled.config == null;
  };

  failed = builtins.filter (name: !checks.${name}) (builtins.attrNames checks);
in
if failed == [ ] then
  true
else
  throw "nixos-module/network.nix: failed: ${builtins.concatStringsSep "; " failed}"
