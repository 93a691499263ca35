# ---------------------------------------------------------------------------
# Naming and placement
# ---------------------------------------------------------------------------

variable "name" {
  description = "Name prefix for every resource this module creates (IAM role, instance profile, security group, launch templates, autoscaling groups). Lower case letters, digits and hyphens."
  type        = string
  default     = "consul"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,26}$", var.name))
    error_message = "The name must be 1 to 27 characters of lower case letters, digits and hyphens, starting with a letter or digit."
  }
}

variable "vpc_id" {
  description = "ID of the VPC the Consul instances run in. The security group is created in it."
  type        = string
}

variable "subnet_ids" {
  description = "Subnets (ideally one per availability zone) the autoscaling groups launch instances into. The instances need a route to S3 and the EC2 API: a NAT gateway, or VPC endpoints for S3 and EC2."
  type        = list(string)

  validation {
    condition     = can(var.subnet_ids[0])
    error_message = "Give at least one subnet."
  }
}

variable "client_cidr_blocks" {
  description = "CIDR blocks (for example the VPC CIDR) allowed to reach the Consul HTTP API (8500/tcp) and DNS (8600/tcp+udp) from outside the security group. Empty: only members of the group reach them."
  type        = list(string)
  default     = []

  validation {
    # A network address: EC2 refuses host bits (10.0.0.5/16) in a rule.
    condition     = alltrue([for c in var.client_cidr_blocks : can(cidrnetmask(c)) ? contains([cidrsubnet(c, 0, 0)], c) : false])
    error_message = "client_cidr_blocks must be IPv4 CIDR blocks such as 10.0.0.0/16 (a network address: no host bits set)."
  }
}

variable "wan_cidr_blocks" {
  description = "IPv4 CIDR blocks of the other datacenters' servers (for example the other region's VPC CIDR), allowed to reach this datacenter's servers over Consul's WAN: Serf WAN (8302/tcp+udp) and server RPC (8300/tcp). The rules are on the servers' own security group (server_security_group_id): agents open nothing to them. Empty: no WAN rules."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for c in var.wan_cidr_blocks : can(cidrnetmask(c)) ? contains([cidrsubnet(c, 0, 0)], c) : false])
    error_message = "wan_cidr_blocks must be IPv4 CIDR blocks such as 10.1.0.0/16 (a network address: no host bits set): the other datacenters' VPC CIDRs."
  }
}

variable "tags" {
  description = "Tags added to every resource that takes tags, and propagated to the instances. The instances' tags are in their metadata (IMDS), where EC2 accepts only keys of letters, digits and + - = . , _ : @ (no \"/\", no space), and not \".\", \"..\" or \"_index\": a launch with any other key fails."
  type        = map(string)
  default     = {}

  validation {
    # EC2 fails every launch whose instance tag keys break the rule for
    # tags in instance metadata ("Work with instance tags in instance
    # metadata", EC2 user guide).
    condition     = contains([0], length([for k in keys(var.tags) : k if anytrue([can(regex("[^A-Za-z0-9+=.,_:@-]", k)), contains([".", "..", "_index"], k)])]))
    error_message = "Tag keys ${join(", ", [for k in keys(var.tags) : jsonencode(k) if anytrue([can(regex("[^A-Za-z0-9+=.,_:@-]", k)), contains([".", "..", "_index"], k)])])} cannot be instance tags in instance metadata (which the launch gate reads): use only letters, digits and + - = . , _ : @ in tag keys (no \"/\", no space), and not \".\", \"..\" or \"_index\"."
  }
}

# ---------------------------------------------------------------------------
# Registry bucket
# ---------------------------------------------------------------------------

variable "create_bucket" {
  description = "Create the S3 registry bucket. Set to false to use an existing bucket named by bucket_name (its encryption, public access block and lifecycle are then left to you)."
  type        = bool
  default     = true
}

variable "bucket_name" {
  description = "Name of the registry bucket. Empty with create_bucket = true: a unique name is generated from var.name. Required when create_bucket = false."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])?$", var.bucket_name))
    error_message = "bucket_name must be empty or a valid S3 bucket name (3 to 63 lower case letters, digits, dots and hyphens)."
  }
}

variable "registry_prefix" {
  description = "Key prefix of the registry inside the bucket, without leading or trailing slash (for example \"consul/prod\"). Empty string: the bucket root. One prefix per Consul cluster."
  type        = string
  default     = "consul"

  validation {
    condition     = can(regex("^([A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*)?$", var.registry_prefix))
    error_message = "The registry prefix must not start or end with \"/\", must not contain \"//\", and may only use S3 safe characters."
  }
}

variable "force_destroy" {
  description = "Allow terraform destroy to delete the bucket while it still holds heartbeats. Handy for tests, dangerous for a live cluster."
  type        = bool
  default     = false
}

variable "heartbeat_retention_days" {
  description = "Lifecycle backstop: objects under PREFIX/servers/ and PREFIX/agents/ older than this many days are deleted by S3 even if no node purged them (auto-consul purges expired heartbeats itself within seconds)."
  type        = number
  default     = 1

  validation {
    condition     = can(regex("^[1-9][0-9]*$", tostring(var.heartbeat_retention_days)))
    error_message = "heartbeat_retention_days must be a whole number of days, 1 or more (S3 lifecycle works in days)."
  }
}

variable "snapshot_interval" {
  description = "Seconds between the Consul leader's snapshots to PREFIX/snapshots/ in the registry bucket (the recovery point of a lost cluster); 0 turns them off. Written to the servers' env file as AUTO_CONSUL_SNAPSHOT_INTERVAL."
  type        = number
  default     = 3600

  validation {
    condition     = alltrue([can(regex("^[0-9]+$", tostring(var.snapshot_interval))), contains([0, min(max(var.snapshot_interval, 60), 604800)], var.snapshot_interval)])
    error_message = "snapshot_interval must be 0 or a whole number of seconds from 60 to 604800."
  }
}

variable "snapshot_keep" {
  description = "How many snapshots the leader keeps (AUTO_CONSUL_SNAPSHOT_KEEP); older ones are deleted after each save."
  type        = number
  default     = 24

  validation {
    condition     = alltrue([can(regex("^[0-9]+$", tostring(var.snapshot_keep))), contains([var.snapshot_keep], min(max(var.snapshot_keep, 1), 10000))])
    error_message = "snapshot_keep must be a whole number from 1 to 10000."
  }
}

variable "snapshot_retention_days" {
  description = "Lifecycle backstop: snapshots under PREFIX/snapshots/ older than this many days are deleted by S3 (the leader keeps its newest --snapshot-keep itself); long enough to restore a cluster that has been gone a while."
  type        = number
  default     = 30

  validation {
    condition     = can(regex("^[1-9][0-9]*$", tostring(var.snapshot_retention_days)))
    error_message = "snapshot_retention_days must be a whole number of days, 1 or more (S3 lifecycle works in days)."
  }
}

# ---------------------------------------------------------------------------
# Cluster settings (written to /etc/auto-consul/auto-consul.env)
# ---------------------------------------------------------------------------

variable "servers" {
  description = "Desired number of Consul servers (AUTO_CONSUL_SERVERS). Also the desired size of the servers autoscaling group. Odd numbers keep a Raft quorum: 3 tolerates one failure, 5 two."
  type        = number
  default     = 3

  validation {
    condition     = contains([1, 3, 5, 7], var.servers)
    error_message = "servers must be 1, 3, 5 or 7."
  }
}

variable "expiry" {
  description = "Heartbeat and server slot expiry in seconds (AUTO_CONSUL_EXPIRY). The heartbeat timer fires every expiry/3. Seeds a new cluster's record, which then rules."
  type        = number
  default     = 120

  validation {
    # Whole number, and unchanged when clamped to [10, 86400].
    condition     = alltrue([can(regex("^[0-9]+$", tostring(var.expiry))), contains([var.expiry], min(max(var.expiry, 10), 86400))])
    error_message = "expiry must be a whole number of seconds between 10 and 86400."
  }
}

variable "datacenter" {
  description = "Consul datacenter name (AUTO_CONSUL_DATACENTER)."
  type        = string
  default     = "dc1"

  validation {
    condition     = can(regex("^[a-z0-9_-]+$", var.datacenter))
    error_message = "The datacenter may only contain lower case letters, digits, \"_\" and \"-\"."
  }
}

variable "domain" {
  description = "Consul's DNS domain, and the name in servers' certificates: server.<datacenter>.<domain> (AUTO_CONSUL_DOMAIN)."
  type        = string
  default     = "consul"

  validation {
    condition     = can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?[.])*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.domain))
    error_message = "The domain must be dot-separated labels of lower case letters, digits and \"-\" (e.g. consul or consul.example.com)."
  }
}

variable "primary_registry" {
  description = "A secondary datacenter's primary: the primary cluster's registry, s3://BUCKET/PREFIX (AUTO_CONSUL_PRIMARY_REGISTRY, servers only). Recorded at this cluster's genesis; its servers join the primary's live servers over the WAN. Empty: this cluster is a primary."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^/]+)*)?$", var.primary_registry))
    error_message = "primary_registry must be empty or s3://BUCKET/PREFIX, the primary cluster's registry."
  }
}

variable "primary_ssm_path" {
  description = "A secondary datacenter with secrets: the primary cluster's ssm_path. Its servers read the secrets the datacenters share there (the gossip key, the CA, the ACL replication token: nothing else), in any region of this account. Empty: no grant (a secondary without secrets)."
  type        = string
  default     = ""

  validation {
    condition     = can(regex("^((/[A-Za-z0-9_.-]+)+)?$", var.primary_ssm_path))
    error_message = "primary_ssm_path must be empty or like /auto-consul/dc1: the primary module's ssm_path."
  }
}

variable "consul_data_dir" {
  description = "Consul data directory on the instances (AUTO_CONSUL_DATA_DIR)."
  type        = string
  default     = "/opt/consul"
}

variable "consul_config_dir" {
  description = "Consul configuration directory on the instances (AUTO_CONSUL_CONFIG_DIR)."
  type        = string
  default     = "/etc/consul.d"
}

variable "baked_image" {
  description = "True when the AMI was baked with `auto-consul install` (see packer/): user data then only writes the env file and the baked auto-consul.service runs at boot. False: user data writes the env file and runs `auto-consul install --now`, which starts the retried boot unit."
  type        = bool
  default     = false
}

# ---------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------

variable "ami_id" {
  description = "AMI for both groups. It must have Consul installed (HashiCorp's package: /usr/bin/consul and consul.service) and auto-consul on PATH (/usr/bin from the .deb, or /usr/local/bin)."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]+$", var.ami_id))
    error_message = "ami_id must look like ami-0123456789abcdef0."
  }
}

variable "server_instance_type" {
  description = "Instance type of the servers group."
  type        = string
  default     = "t3.small"
}

variable "agent_instance_type" {
  description = "Instance type of the agents group."
  type        = string
  default     = "t3.small"
}

variable "key_name" {
  description = "EC2 key pair for SSH access. Null: no key pair."
  type        = string
  default     = null
}

variable "agents_min_size" {
  description = "Minimum size of the agents autoscaling group."
  type        = number
  default     = 0

  validation {
    condition     = can(regex("^[0-9]+$", tostring(var.agents_min_size)))
    error_message = "agents_min_size must be a whole number, 0 or more."
  }
}

variable "agents_desired_capacity" {
  description = "Desired size of the agents autoscaling group."
  type        = number
  default     = 2

  validation {
    condition     = can(regex("^[0-9]+$", tostring(var.agents_desired_capacity)))
    error_message = "agents_desired_capacity must be a whole number, 0 or more."
  }
}

variable "agents_max_size" {
  description = "Maximum size of the agents autoscaling group."
  type        = number
  default     = 10

  validation {
    condition     = can(regex("^[0-9]+$", tostring(var.agents_max_size)))
    error_message = "agents_max_size must be a whole number, 0 or more."
  }
}

variable "imds_hop_limit" {
  description = "IMDSv2 PUT response hop limit. 1 (default): only processes on the instance itself get a token, so a container on the host cannot read the instance role's credentials. 2: needed only if auto-consul (or something else that must reach IMDS) runs inside a container with bridged networking."
  type        = number
  default     = 1

  validation {
    condition     = contains([1, 2], var.imds_hop_limit)
    error_message = "imds_hop_limit must be 1 or 2."
  }
}

variable "additional_policy_arns" {
  description = "Extra managed policies to attach to both instance roles, the servers' and the agents' (for example AmazonSSMManagedInstanceCore for Session Manager). auto-consul itself needs none of them."
  type        = list(string)
  default     = []
}

variable "agent_expiry" {
  description = "Agents' heartbeat expiry in seconds (AUTO_CONSUL_AGENT_EXPIRY); agents heartbeat every agent_expiry/3. Long, because agents' heartbeats are most of the registry's requests and only join lists use them: 7200 keeps a 1 000-node fleet near $9 a month of S3 requests. Seeds a new cluster's record, which then rules."
  type        = number
  default     = 7200

  validation {
    # Whole number, and unchanged when clamped to [10, 86400].
    condition     = alltrue([can(regex("^[0-9]+$", tostring(var.agent_expiry))), contains([var.agent_expiry], min(max(var.agent_expiry, 10), 86400))])
    error_message = "agent_expiry must be a whole number of seconds between 10 and 86400."
  }
}

variable "launch_wait" {
  description = "Seconds a launching instance may stay in Pending:Wait without a word from it before the group abandons it; 60 to 7200. auto-consul records a lifecycle heartbeat every 20 s (a third of the shortest wait) from the start of its boot until its launch gate completes the hook."
  type        = number
  default     = 300

  validation {
    # Whole number, and unchanged when clamped to [60, 7200]. (range() would
    # make more than the 1024 values Terraform allows, failing every plan.)
    condition     = alltrue([can(regex("^[0-9]+$", tostring(var.launch_wait))), contains([var.launch_wait], min(max(var.launch_wait, 60), 7200))])
    error_message = "launch_wait must be a whole number of seconds from 60 to 7200."
  }
}

variable "termination_wait" {
  description = "Seconds a terminating instance waits (lifecycle hook, Terminating:Wait) so that its heartbeat, every expiry/3, sees the termination and leaves while Consul still runs: about two heartbeat intervals (90 for the default expiry of 120); 30 to 7200."
  type        = number
  default     = 90

  validation {
    # Whole number, and unchanged when clamped to [30, 7200] (the heartbeat
    # timeout AWS accepts for a lifecycle hook).
    condition     = alltrue([can(regex("^[0-9]+$", tostring(var.termination_wait))), contains([var.termination_wait], min(max(var.termination_wait, 30), 7200))])
    error_message = "termination_wait must be a whole number of seconds from 30 to 7200."
  }
}

variable "cloud_auto_join" {
  description = "Add Consul's cloud auto-join entry (provider=aws, instances tagged auto-consul:cluster = name) to the agents' retry_join, after the registry's addresses: agents still find the cluster when the registry cannot be read. Servers never get it. Consul joins every instance it finds, so name must be unique to this cluster."
  type        = bool
  default     = true
}

# ---------------------------------------------------------------------------
# Secrets (gossip key, CA, ACL tokens) in SSM Parameter Store
# ---------------------------------------------------------------------------

variable "secrets" {
  description = "Keep the cluster's secrets in SSM Parameter Store under ssm_path (AUTO_CONSUL_SECRETS=ssm://<ssm_path>): the first node that needs each secret creates it (SecureString, create-only), every other node reads it. Servers may make and read all of them; agents may read only <ssm_path>/<cluster id>/agent/*. False: no AUTO_CONSUL_SECRETS in the user data (the IAM grants on ssm_path stay, and name only that path)."
  type        = bool
  default     = true
}

variable "ssm_path" {
  description = "SSM Parameter Store path of the cluster's secrets, without trailing slash (for example \"/auto-consul/prod\"). Parameters live under <ssm_path>/<cluster id>/agent/ (gossip-key, ca-cert, agent-token: both roles read) and <ssm_path>/<cluster id>/server/ (ca, management-token: servers only). Empty: \"/auto-consul/<name>\", one path per cluster, so clusters in one account never share secrets."
  type        = string
  default     = ""

  validation {
    # SSM names: letters, digits, "_", ".", "-" and "/"; names may not begin
    # with "aws" or "ssm" (any case).
    condition     = alltrue([can(regex("^((/[A-Za-z0-9_.-]+)+)?$", var.ssm_path)), contains([false], can(regex("^/(?i)(aws|ssm)", var.ssm_path)))])
    error_message = "ssm_path must be empty or like /auto-consul/prod: \"/\"-separated segments of letters, digits, \"_\", \".\" and \"-\", no trailing \"/\", and not starting with /aws or /ssm."
  }
}
