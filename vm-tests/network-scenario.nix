# The guest-network NixOS VM test, on the hypervisor given: the
# services.hypeman.network options on a real NixOS host, with two busybox
# guests declared `network.enabled = true`, and a second node, `outside`,
# that only NAT can reach them from.
#
# It is the scenario of tests/e2e_network.rs
# (`guests_reach_the_host_the_host_reaches_them_and_they_reach_each_other`,
# QEMU under TCG in a network namespace); each subtest below is named after
# the step there it mirrors. Steps only NixOS can show are marked "NixOS:":
# the generated settings, the firewall on the bridge, and NAT to `outside`.
# Keep the two in step.
#
#   boot: web and peer Running, each with its own address
#   web -> host (an HTTP server on the gateway), host -> web, peer -> web
#   NixOS: a host port not opened on the bridge is dropped; `outside` sees
#     web's requests from the host's own address (masquerade)
#   specialisation "standby": web in Standby, its TAP and address kept
#   back to the base configuration: restored on the same address, and
#     every path works again; its count goes on (a restore, not a boot)
#   specialisation "stopped": web's TAP removed, its address kept
#   specialisation "removed": both deleted, no TAP left on the bridge
#
# Needs nested KVM like scenario.nix (see there).
{
  pkgs,
  hypervisor,
  package ? null,
}:

let
  inherit (pkgs) lib;
  common = import ./common.nix { inherit pkgs hypervisor package; };

  # As in tests/e2e_network.rs.
  bridge = "vmbr0";
  subnet = "10.77.0.0/24";
  gateway = "10.77.0.1";
  hostPort = 8081;
  guestPort = 8080;
  # A host port with a server on it that the bridge's firewall keeps closed.
  closedPort = 8082;
  dns = "192.0.2.53";

  hostUrl = port: path: "http://${gateway}:${toString port}/${path}";

  # tests/e2e_network.rs `guest_script`: serve a page; print the name
  # server and the hosts entry; fetch `fetch` until it answers and print
  # `<tag> <body>`; run `extra`; then fetch it once a second for ever,
  # printing `REACH <n>` after each answer (n counts attempts, so a
  # restored guest goes on counting where it stopped).
  guestScript =
    fetch: tag: extra:
    lib.concatStringsSep "; " (
      [
        "mkdir -p /www"
        "echo hello-from-$(hostname) > /www/index.html"
        "httpd -p ${toString guestPort} -h /www"
        "echo RESOLV $(grep nameserver /etc/resolv.conf)"
        "echo HOSTS $(grep $(hostname) /etc/hosts)"
        "until got=$(wget -q -O - ${fetch}); do sleep 0.3; done"
        "echo ${tag} $got"
      ]
      ++ extra
      ++ [
        "n=0"
        "while true; do sleep 1; n=$((n+1)); if wget -q -O /dev/null ${fetch}; then echo REACH $n; fi; done"
      ]
    );

  guest = script: {
    image = "oci-archive:${common.image}:latest";
    inherit hypervisor;
    vcpus = 1;
    memory = "256MiB";
    cmd = [
      "/bin/sh"
      "-c"
      script
    ];
    network.enabled = true;
  };
in
{
  name = "hypeman-network-${hypervisor}";

  meta.timeout = 1800;

  # A host on the test network (vlan 1) and nothing else: it has no route
  # to the guests' subnet, so it can only answer them through the NAT on
  # `machine`. It answers every request with the address it came from.
  nodes.outside = {
    networking.firewall.allowedTCPPorts = [ 80 ];
    systemd.services.whoami = {
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      serviceConfig.ExecStart = "${pkgs.python3}/bin/python3 ${pkgs.writeText "whoami.py" ''
        import http.server


        class WhoAmI(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = (self.client_address[0] + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)


        http.server.ThreadingHTTPServer(("", 80), WhoAmI).serve_forever()
      ''}";
    };
  };

  nodes.machine =
    { lib, nodes, ... }:
    {
      imports = [ common.machine ];

      services.hypeman.network = {
        inherit bridge subnet;
        dns = [ dns ];
        nat = {
          enable = true;
          externalInterface = "eth1";
        };
        firewall.allowedTCPPorts = [ hostPort ];
      };

      services.hypeman.instances = {
        web = guest (
          guestScript (hostUrl hostPort "ping") "HOST_SAYS" [
            "if timeout 5 wget -q -O /dev/null ${hostUrl closedPort "ping"}; then echo CLOSED_PORT open; else echo CLOSED_PORT blocked; fi"
            "i=0; until out=$(timeout 5 wget -q -O - http://${nodes.outside.networking.primaryIPAddress}/) || [ $i -ge 10 ]; do i=$((i+1)); sleep 1; done"
            "echo OUTSIDE_SEES $out"
          ]
        );
        # Learns web's address from the host (the test writes it there once
        # the daemon has given web one), then reaches web.
        peer = guest (
          "until web=$(wget -q -O - ${hostUrl hostPort "web-ip"}) && [ -n \"$web\" ]; do sleep 1; done; "
          + guestScript "http://$web:${toString guestPort}/" "PEER_SAYS" [ ]
        );
      };

      # The host's HTTP servers the guests fetch from: one on a port opened
      # on the bridge, one on a port that is not.
      systemd.tmpfiles.rules = [
        "d /srv/host-www 0755 root root - -"
        "f+ /srv/host-www/ping 0644 root root - pong-from-host"
      ];
      systemd.services =
        lib.mapAttrs'
          (
            what: port:
            lib.nameValuePair "host-http-${what}" {
              description = "busybox httpd on the ${what} port ${toString port}";
              wantedBy = [ "multi-user.target" ];
              before = [ "hypeman.service" ];
              serviceConfig.ExecStart = "${pkgs.busybox}/bin/busybox httpd -f -p ${toString port} -h /srv/host-www";
            }
          )
          {
            open = hostPort;
            closed = closedPort;
          };

      environment.systemPackages = [ pkgs.curl ];

      # Each inherits everything above and changes one thing.
      specialisation.standby.configuration = {
        services.hypeman.instances.web.state = lib.mkForce "standby";
      };
      specialisation.stopped.configuration = {
        services.hypeman.instances.web.state = lib.mkForce "stopped";
      };
      specialisation.removed.configuration = {
        services.hypeman.instances = lib.mkForce { };
      };
    };

  testScript =
    { nodes, ... }:
    let
      toplevel = nodes.machine.system.build.toplevel;
    in
    ''
      ${common.pythonHelpers}

      BASE = "${toplevel}/bin/switch-to-configuration test"
      STANDBY = "${toplevel}/specialisation/standby/bin/switch-to-configuration test"
      STOPPED = "${toplevel}/specialisation/stopped/bin/switch-to-configuration test"
      REMOVED = "${toplevel}/specialisation/removed/bin/switch-to-configuration test"
      BRIDGE = "${bridge}"
      GATEWAY = "${gateway}"
      HOST_ADDRESS = "${nodes.machine.networking.primaryIPAddress}"


      def wait_line(name, prefix):
          """The first line of name's console that starts with prefix, once
          there is one."""
          found = []

          def printed(_):
              for line in app_log(name).splitlines():
                  if line.strip().startswith(prefix):
                      found.append(line.strip())
                      return True
              return False

          retry(printed, timeout=120)
          return found[0]


      def numbers(name, prefix):
          """The n of every `<prefix> <n>` line of name's console, in order."""
          return [int(n) for n in re.findall(rf"^\s*{prefix} (\d+)\s*$", app_log(name), re.M)]


      def after(before, now):
          """What `now` has past `before`: the console log may go on or
          start afresh when a VMM is started again."""
          return now[len(before):] if now[: len(before)] == before else now


      def page(ip):
          return machine.succeed(f"curl -sf --max-time 10 http://{ip}:${toString guestPort}/").strip()


      def tap_of(instance):
          return "hm" + instance["id"].lower()[13:]


      def on_bridge():
          return machine.succeed(f"ip -o link show master {BRIDGE}")


      start_all()
      machine.wait_for_unit("hypeman.service")
      machine.succeed("test -c /dev/kvm")  # no nested KVM: nothing below can work
      outside.wait_for_unit("whoami.service")

      with subtest("NixOS: the settings' [network] table and the host around the bridge"):
          machine.succeed("hypeman validate")
          settings = machine.succeed("cat /etc/hypeman/hypeman.toml")
          assert f'bridge = "{BRIDGE}"' in settings, settings
          assert 'subnet = "${subnet}"' in settings, settings
          assert machine.succeed("sysctl -n net.ipv4.ip_forward").strip() == "1"

      with subtest("web: guest -> host, through the TAP and the bridge"):
          machine.succeed("hypeman wait web --state Running --timeout 300s")
          web = status("web")
          web_ip = web["ip"]
          assert web_ip and web_ip.startswith("10.77.0.") and web_ip != GATEWAY, web
          assert wait_line("web", "HOST_SAYS") == "HOST_SAYS pong-from-host"
          assert wait_line("web", "RESOLV") == "RESOLV nameserver ${dns}"
          assert wait_line("web", "HOSTS") == f"HOSTS {web_ip} web"

      with subtest("NixOS: a host port not opened on the bridge is dropped"):
          machine.succeed("curl -sf --max-time 5 http://127.0.0.1:${toString closedPort}/ping")
          assert wait_line("web", "CLOSED_PORT") == "CLOSED_PORT blocked"
          machine.wait_until_succeeds(
              f"journalctl -k | grep -q 'refused connection: IN={BRIDGE} .*DPT=${toString closedPort}'",
              timeout=30,
          )

      with subtest("NixOS: outbound through NAT, from the host's address"):
          assert wait_line("web", "OUTSIDE_SEES") == f"OUTSIDE_SEES {HOST_ADDRESS}"

      with subtest("host -> guest"):
          assert page(web_ip) == "hello-from-web"
          machine.succeed(f"ping -c 3 -W 5 {web_ip}")

      with subtest("the bridge and the TAP are where the daemon put them"):
          tap = tap_of(web)
          assert tap in on_bridge(), f"{tap} is not on {BRIDGE}: {on_bridge()}"
          addr = machine.succeed(f"ip -o -4 addr show dev {BRIDGE}")
          assert f"{GATEWAY}/24" in addr, addr

      with subtest("a second guest: its own address, and it reaches the first one"):
          machine.succeed(f"echo {web_ip} > /srv/host-www/web-ip")
          machine.succeed("hypeman wait peer --state Running --timeout 300s")
          peer_ip = status("peer")["ip"]
          assert peer_ip and peer_ip.startswith("10.77.0.") and peer_ip not in (web_ip, GATEWAY), peer_ip
          assert wait_line("peer", "PEER_SAYS") == "PEER_SAYS hello-from-web"

      with subtest("standby keeps the TAP and the address"):
          wait_line("web", "REACH")
          machine.succeed(STANDBY)
          machine.succeed("hypeman wait web --state Standby --timeout 180s")
          assert status("web")["has_snapshot"], status("web")
          assert status("web")["ip"] == web_ip, status("web")
          assert tap in on_bridge(), f"a guest in standby keeps its TAP: {on_bridge()}"
          machine.fail(f"curl -sf --max-time 3 http://{web_ip}:${toString guestPort}/")
          web_before = numbers("web", "REACH")
          peer_before = numbers("peer", "REACH")
          last_before = web_before[-1]

      with subtest("restored: the same address, and every path works again"):
          machine.succeed(BASE)
          machine.succeed("hypeman wait web --state Running --timeout 180s")
          assert status("web")["ip"] == web_ip, status("web")
          assert page(web_ip) == "hello-from-web", "host -> guest after the restore"

          def web_reached_the_host(_):
              return len(after(web_before, numbers("web", "REACH"))) >= 1

          retry(web_reached_the_host, timeout=120)
          first = after(web_before, numbers("web", "REACH"))[0]
          assert first > last_before, (
              f"web's count restarted: {last_before} before standby, {first} after"
              " (a cold boot, not a restore)"
          )

          def peer_reached_web(_):
              return len(after(peer_before, numbers("peer", "REACH"))) >= 1

          retry(peer_reached_web, timeout=120)

      with subtest("stopped: the TAP goes, the address stays the guest's"):
          machine.succeed(STOPPED)
          machine.succeed("hypeman wait web --state Stopped --timeout 180s")
          machine.wait_until_succeeds(f"! ip link show dev {tap}", timeout=30)
          assert status("web")["ip"] == web_ip, "the lease is kept"

      with subtest("deleted: the guests and their TAPs go"):
          machine.succeed(REMOVED)
          machine.wait_until_succeeds(
              "test -z \"$(ls -A /var/lib/hypeman/guests)\"", timeout=180
          )
          machine.wait_until_fails(f"ip -o link show master {BRIDGE} | grep -q ': hm'", timeout=60)
          machine.fail(f"pgrep -f '{VMM}'")
    '';
}
