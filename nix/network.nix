# Guest networking as the NixOS module sees it: the daemon's rules for the
# `[network]` settings (src/settings.rs, src/network/names.rs and ipam.rs),
# the gateway it derives, the settings table the module writes, and the
# interface patterns other network managers must keep their hands off.
# Builtins only, so .ci/nix-parse-check.sh evaluates all of it without
# nixpkgs; the module (nixos-module/default.nix) imports it.
rec {
  # Every TAP the daemon makes is "hm" + 13 characters of the guest's ID.
  tapPrefix = "hm";
  tapGlob = "${tapPrefix}*";

  # check_ifname, plus the settings' rule that a bridge must not look like a
  # TAP (the daemon could take it for one and remove it). null: fine.
  bridgeProblem =
    name:
    if builtins.match "[A-Za-z0-9._-]{1,15}" name == null || name == "." || name == ".." then
      "must be 1 to 15 characters of A-Z a-z 0-9 . _ - (a Linux interface name)"
    else if builtins.substring 0 (builtins.stringLength tapPrefix) name == tapPrefix then
      "must not start with \"${tapPrefix}\", the prefix of guest TAPs"
    else
      null;

  # "10.100.0.0/16" -> { address = <32-bit int>; prefix = 16; } or a reason
  # it is not one, worded as the daemon words it.
  parseSubnet =
    text:
    let
      # Octets as Rust's Ipv4Addr reads them: no leading zeros, at most 255.
      octet = "(0|[1-9][0-9]{0,2})";
      m = builtins.match "${octet}\\.${octet}\\.${octet}\\.${octet}/0*([0-9]{1,3})" text;
      nums = map builtins.fromJSON m;
      octets = builtins.genList (i: builtins.elemAt nums i) 4;
      prefix = builtins.elemAt nums 4;
      address = builtins.foldl' (acc: o: acc * 256 + o) 0 octets;
      hostBits = (pow2 (32 - prefix)) - 1;
      network = address - (builtins.bitAnd address hostBits);
      notASubnet = {
        problem = "${builtins.toJSON text} is not an IPv4 subnet such as \"10.100.0.0/16\"";
      };
    in
    if m == null || builtins.any (o: o > 255) octets || prefix > 255 then
      notASubnet
    else if prefix < 8 || prefix > 30 then
      { problem = "the prefix length must be between 8 and 30, not ${toString prefix}"; }
    else if network != address then
      {
        problem = "${formatAddress address} has host bits set for /${toString prefix}; write ${formatAddress network}/${toString prefix}";
      }
    else
      { inherit address prefix; };

  subnetProblem =
    text:
    let
      parsed = parseSubnet text;
    in
    parsed.problem or null;

  # The bridge's address and the guests' default route: the subnet's first
  # address after the network address (Subnet::gateway).
  gateway =
    text:
    let
      parsed = parseSubnet text;
    in
    if parsed ? problem then
      throw "hypeman: no gateway for the subnet ${text}: ${parsed.problem}"
    else
      formatAddress (parsed.address + 1);

  # The `[network]` table of hypeman.toml, from the module's typed options.
  settingsTable =
    {
      bridge,
      subnet,
      dns,
    }:
    {
      inherit bridge subnet dns;
    };

  # What NetworkManager, systemd-networkd and dhcpcd are told to leave
  # alone: the bridge (the daemon gives it its address) and every TAP.
  networkManagerUnmanaged = bridge: [
    "interface-name:${bridge}"
    "interface-name:${tapGlob}"
  ];
  networkdMatchName = bridge: "${bridge} ${tapGlob}";
  dhcpcdDeny = bridge: [
    bridge
    tapGlob
  ];

  pow2 = n: if n == 0 then 1 else 2 * pow2 (n - 1);

  formatAddress =
    n:
    builtins.concatStringsSep "." (
      map (shift: toString (builtins.bitAnd (n / pow2 shift) 255)) [
        24
        16
        8
        0
      ]
    );
}
