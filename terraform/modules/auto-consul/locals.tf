# The module's values that depend on its variables only, never on a
# resource or a data source: tests/terraform_plan.rs plans this file with
# variables.tf, with real Terraform and no provider, so every expression
# here (and every variable validation) is evaluated as a plan evaluates it.
# Keep resource-independent locals here, and resource-dependent ones in
# main.tf.

locals {
  # compact() drops an empty prefix, so the bucket root works too:
  # "consul/prod" -> key prefix "consul/prod/", URL s3://BUCKET/consul/prod;
  # ""            -> key prefix "",             URL s3://BUCKET.
  key_prefix = join("", [for p in compact([var.registry_prefix]) : "${p}/"])

  # A secondary's primary registry, split as the servers' read grant needs
  # it: "s3://b/consul/dc1" -> bucket "b", key prefix "consul/dc1/".
  primary_parts  = regex("^(?:s3://([^/]+)/?(.*))?$", var.primary_registry)
  primary_bucket = join("", compact([local.primary_parts[0]]))
  primary_prefix = join("", [for p in compact([local.primary_parts[1]]) : "${p}/"])

  # Consul's ports, opened to members of the security group only. 8500 (HTTP
  # API) and 8600 (DNS) can additionally be opened to var.client_cidr_blocks.
  consul_ports = {
    server-rpc-tcp = { port = 8300, protocol = "tcp", description = "Consul server RPC" }
    serf-lan-tcp   = { port = 8301, protocol = "tcp", description = "Consul LAN gossip (serf)" }
    serf-lan-udp   = { port = 8301, protocol = "udp", description = "Consul LAN gossip (serf)" }
    serf-wan-tcp   = { port = 8302, protocol = "tcp", description = "Consul WAN gossip (serf)" }
    serf-wan-udp   = { port = 8302, protocol = "udp", description = "Consul WAN gossip (serf)" }
    http-tcp       = { port = 8500, protocol = "tcp", description = "Consul HTTP API" }
    dns-tcp        = { port = 8600, protocol = "tcp", description = "Consul DNS" }
    dns-udp        = { port = 8600, protocol = "udp", description = "Consul DNS" }
  }

  client_ports = {
    for key, rule in local.consul_ports : key => rule if contains([8500, 8600], rule.port)
  }

  client_rules = merge([
    for cidr in var.client_cidr_blocks : {
      for key, rule in local.client_ports : "${key}-${cidr}" => merge(rule, { cidr = cidr })
    }
  ]...)

  # Consul's WAN between datacenters, on the servers' own security group:
  # Serf WAN and server RPC from each of wan_cidr_blocks.
  wan_ports = {
    for key, rule in local.consul_ports : key => rule if contains([8300, 8302], rule.port)
  }

  wan_rules = merge([
    for cidr in var.wan_cidr_blocks : {
      for key, rule in local.wan_ports : "${key}-${cidr}" => merge(rule, { cidr = cidr })
    }
  ]...)

  # The IAM role of each autoscaling group (keys of local.groups).
  group_role = { servers = "server", agents = "agent" }

  # The servers' role and profile keep the name prefix of the single role
  # of earlier versions (see the moved blocks below).
  role_name_prefix = { server = "${var.name}-", agent = "${var.name}-agent-" }

  # SSM path of the cluster's secrets: <ssm_path>/<cluster id>/{agent,server}/...
  # Defaults to one path per module instance, so two clusters in one account
  # never read each other's secrets.
  ssm_path    = coalesce(var.ssm_path, "/auto-consul/${var.name}")
  secrets_url = var.secrets ? "ssm://${local.ssm_path}" : ""

  # The launch and termination hooks of both groups, by "<group>-<hook>":
  # on the groups at creation (initial_lifecycle_hook, so the first
  # instances already wait for their gate) and as aws_autoscaling_lifecycle_hook
  # resources, which keep them up to date afterwards.
  lifecycle_hooks = merge([for group in ["servers", "agents"] : {
    "${group}-launch" = {
      group             = group
      name              = "auto-consul-launch"
      transition        = "autoscaling:EC2_INSTANCE_LAUNCHING"
      default_result    = "ABANDON"
      heartbeat_timeout = var.launch_wait
    }
    "${group}-leave" = {
      group             = group
      name              = "auto-consul-leave"
      transition        = "autoscaling:EC2_INSTANCE_TERMINATING"
      default_result    = "CONTINUE"
      heartbeat_timeout = var.termination_wait
    }
  }]...)

  # An autoscaling group's name is its name_prefix and the 26 characters
  # the AWS provider appends (terraform-plugin-sdk helper/id,
  # UniqueIDSuffixLength), so 26 "?" (one character each in an IAM ARN)
  # match this cluster's group and no other: not the other group of this
  # cluster, nor a group of a cluster whose name starts with this one's
  # ("consul" vs "consul-prod").
  asg_name_pattern = { for group in ["servers", "agents"] : group => "${var.name}-${group}-${join("", [for i in range(26) : "?"])}" }

  # The servers group keeps a quorum in service while it rolls:
  # floor(100 * (servers - 1) / servers), as a table (no arithmetic
  # operators in this module).
  servers_min_healthy_percentage = lookup({ "1" = 0, "2" = 50, "3" = 66, "4" = 75, "5" = 80, "6" = 83, "7" = 85, "8" = 87, "9" = 88 }, tostring(var.servers), 66)

  groups = {
    servers = {
      instance_type = var.server_instance_type
      min_size      = var.servers
      max_size      = var.servers
      desired       = var.servers
    }
    agents = {
      instance_type = var.agent_instance_type
      min_size      = var.agents_min_size
      max_size      = var.agents_max_size
      desired       = var.agents_desired_capacity
    }
  }
}
