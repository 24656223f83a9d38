# services.hypeman.network: the host side of guest networking.
#
# The daemon makes the bridge (with the gateway address) and one TAP per
# networked guest itself; it runs as root with every capability, so
# CAP_NET_ADMIN and /dev/net/tun are there (the unit in default.nix is not
# sandboxed). What this module adds is the host around them: the settings'
# `[network]` table, the firewall on the bridge, NAT for outbound access,
# and NetworkManager / systemd-networkd / dhcpcd kept off the bridge and the
# `hm*` TAPs. hypeman itself never routes or NATs.
{
  config,
  lib,
  ...
}:

let
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    types
    ;

  cfg = config.services.hypeman;
  netCfg = cfg.network;

  # The daemon's `[network]` rules, the gateway, the interface patterns
  # (builtins only; .ci/nix-parse-check.sh evaluates them).
  net = import ../nix/network.nix;

  # The uplink NAT masquerades to: ours, else one set for networking.nat.
  natExternal =
    if netCfg.nat.externalInterface != null then
      netCfg.nat.externalInterface
    else
      config.networking.nat.externalInterface or null;

  networkedInstances = lib.attrNames (
    lib.filterAttrs (_: inst: inst.network != null && inst.network.enabled) cfg.instances
  );
in
{
  options.services.hypeman.network = {
    bridge = mkOption {
      type = types.str;
      default = "hypeman0";
      description = ''
        The bridge the guests' TAPs join (settings `network.bridge`). The
        daemon creates it when the first networked guest needs it and
        gives it the gateway address; an existing bridge of that name is
        used as it is. 1 to 15 characters, not starting with `hm` (the
        prefix of guest TAPs).
      '';
    };
    subnet = mkOption {
      type = types.str;
      default = "10.100.0.0/16";
      example = "192.168.100.0/24";
      description = ''
        The IPv4 subnet guests get their static addresses from (settings
        `network.subnet`; prefix length 8 to 30, host bits zero). Its first
        address is the bridge's and the guests' gateway (`gateway`).
      '';
    };
    dns = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "1.1.1.1"
        "2606:4700:4700::1111"
      ];
      description = ''
        Name servers written to the guests' /etc/resolv.conf (settings
        `network.dns`). Empty: none. To use a resolver on the host, list
        the gateway address and open port 53 on the bridge
        (`firewall.allowedUDPPorts`, `firewall.allowedTCPPorts`).
      '';
    };
    gateway = mkOption {
      type = types.str;
      readOnly = true;
      default = net.gateway netCfg.subnet;
      defaultText = lib.literalMD "the first address of `subnet` (`10.100.0.1` by default)";
      description = ''
        The bridge's address and the guests' default route, derived from
        `subnet`. Read-only; handy for a host service the guests use.
      '';
    };

    nat = {
      enable = mkEnableOption ''
        outbound access for the guests: `networking.nat` masquerades the
        bridge's traffic to `externalInterface` (and turns on IPv4
        forwarding). hypeman itself does no routing or NAT'';
      externalInterface = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "eth0";
        description = ''
          The uplink guests' traffic leaves through, set as
          `networking.nat.externalInterface`. null: the one set there
          already; one of the two is required with `nat.enable` (masquerading
          to any interface would also rewrite traffic between guests when
          bridged traffic passes through iptables, as with br_netfilter).
        '';
      };
    };

    firewall = {
      trusted = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Add the bridge to `networking.firewall.trustedInterfaces`: guests
          reach every service on the host. Off by default: guests run
          images you may not control, and host services listening on all
          addresses (sshd, databases) would be open to them. Host → guest
          and guest → guest traffic, replies, and NAT'ed outbound traffic
          need no opening either way.
        '';
      };
      allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
        example = [
          53
          8080
        ];
        description = ''
          Host TCP ports the guests may connect to, opened on the bridge
          only (`networking.firewall.interfaces.<bridge>.allowedTCPPorts`).
        '';
      };
      allowedUDPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
        example = [ 53 ];
        description = ''
          Host UDP ports the guests may send to, opened on the bridge only
          (`networking.firewall.interfaces.<bridge>.allowedUDPPorts`).
        '';
      };
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = net.bridgeProblem netCfg.bridge == null;
        message = ''services.hypeman.network.bridge = "${netCfg.bridge}": the name ${toString (net.bridgeProblem netCfg.bridge)}.'';
      }
      {
        assertion = net.subnetProblem netCfg.subnet == null;
        message = ''services.hypeman.network.subnet = "${netCfg.subnet}": ${toString (net.subnetProblem netCfg.subnet)}.'';
      }
      {
        assertion = netCfg.nat.enable -> natExternal != null;
        message = ''
          services.hypeman.network.nat.enable needs the uplink the guests' traffic
          leaves through: set services.hypeman.network.nat.externalInterface
          (e.g. "eth0") or networking.nat.externalInterface.
        '';
      }
      {
        assertion = netCfg.nat.enable -> natExternal != netCfg.bridge;
        message = ''
          services.hypeman.network.nat.externalInterface is "${netCfg.bridge}", the
          guests' own bridge; it must be the host's uplink (e.g. "eth0").
        '';
      }
      {
        assertion = (cfg.settings.network.bridge or netCfg.bridge) == netCfg.bridge;
        message = ''
          services.hypeman.settings.network.bridge ("${toString (cfg.settings.network.bridge or "")}")
          overrides services.hypeman.network.bridge ("${netCfg.bridge}"): set the bridge
          with services.hypeman.network.bridge only, which also sets up the firewall,
          NAT and NetworkManager for it.
        '';
      }
      {
        assertion = (cfg.settings.network.subnet or netCfg.subnet) == netCfg.subnet;
        message = ''
          services.hypeman.settings.network.subnet ("${toString (cfg.settings.network.subnet or "")}")
          overrides services.hypeman.network.subnet ("${netCfg.subnet}"): set the subnet
          with services.hypeman.network.subnet only, which gateway and the firewall
          follow.
        '';
      }
    ];

    warnings =
      lib.optional
        (
          config.networking.firewall.enable
          && net.subnetProblem netCfg.subnet == null
          && builtins.elem netCfg.gateway netCfg.dns
          && !netCfg.firewall.trusted
          && !(builtins.elem 53 netCfg.firewall.allowedUDPPorts)
        )
        ''
          services.hypeman.network.dns lists the gateway ${netCfg.gateway}, but UDP port 53
          is closed on ${netCfg.bridge}: the guests' name lookups will time out. Add 53 to
          services.hypeman.network.firewall.allowedUDPPorts (and allowedTCPPorts), or set
          services.hypeman.network.firewall.trusted.
        '';

    # Normal priority, not mkDefault: the firewall and NAT below follow
    # these options, so the daemon must use the same bridge and subnet (a
    # different settings.network value is a conflict, a forced one fails
    # the assertions above).
    services.hypeman.settings.network = net.settingsTable {
      inherit (netCfg) bridge subnet dns;
    };

    # `security.lockKernelModules` stops loading modules after boot, and
    # with it the autoloading a bridge or /dev/net/tun would trigger.
    boot.kernelModules = mkIf (networkedInstances != [ ]) [
      "tun"
      "bridge"
    ];

    # Guest → host is filtered like any other inbound traffic; host → guest,
    # guest → guest (bridged) and replies are not.
    networking.firewall.trustedInterfaces = mkIf netCfg.firewall.trusted [ netCfg.bridge ];
    networking.firewall.interfaces.${netCfg.bridge} =
      mkIf (netCfg.firewall.allowedTCPPorts != [ ] || netCfg.firewall.allowedUDPPorts != [ ])
        {
          inherit (netCfg.firewall) allowedTCPPorts allowedUDPPorts;
        };

    # Outbound access. networking.nat marks what comes in on the bridge and
    # masquerades it on the way out of the uplink; it also turns on IPv4
    # forwarding. Guests keep their subnet addresses on the bridge.
    networking.nat = mkIf netCfg.nat.enable {
      enable = true;
      internalInterfaces = [ netCfg.bridge ];
      externalInterface = mkIf (netCfg.nat.externalInterface != null) netCfg.nat.externalInterface;
    };
    # The nftables firewall can filter forwarded traffic too; then the
    # guests' outbound traffic needs its own rule (replies are accepted as
    # established).
    networking.firewall.extraForwardRules =
      mkIf (netCfg.nat.enable && natExternal != null && (config.networking.firewall.filterForward or false))
        ''
          iifname "${netCfg.bridge}" oifname "${natExternal}" accept
        '';

    # The daemon owns the bridge's address and the TAPs; a network manager
    # that configured them (DHCP on the bridge, IPv6 link-local churn, a
    # TAP taken down) would cut the guests off.
    networking.networkmanager.unmanaged = mkIf config.networking.networkmanager.enable (
      net.networkManagerUnmanaged netCfg.bridge
    );
    # Sorted before networkd's catch-all files (NixOS's are 40- and 99-).
    systemd.network.networks."05-hypeman" = mkIf config.systemd.network.enable {
      matchConfig.Name = net.networkdMatchName netCfg.bridge;
      linkConfig.Unmanaged = true;
    };
    networking.dhcpcd.denyInterfaces = net.dhcpcdDeny netCfg.bridge;
  };
}
