# Two Consul datacenters in two regions, federated over the WAN: dc1 in the
# primary region, dc2 in the secondary, 3 servers each.
#
#   terraform init
#   terraform apply -var dc1_ami_id=ami-... -var dc2_ami_id=ami-... \
#     -var dc1_vpc_id=vpc-... -var dc2_vpc_id=vpc-... \
#     -var 'dc1_subnet_ids=["subnet-..."]' -var 'dc2_subnet_ids=["subnet-..."]'
#
# The network between the two VPCs is yours: a VPC peering connection or a
# transit gateway, routed both ways, and VPC CIDRs that do not overlap. This
# example opens only what Consul's WAN needs between the server groups:
# Serf WAN (8302, TCP and UDP) and server RPC (8300, TCP), each way, on each
# module's servers' own security group (wan_cidr_blocks); agents open none.
#
# dc2 names its primary once (primary_registry): its servers join dc1's over
# the WAN, follow them as they are replaced, and run with dc1's gossip key,
# CA and ACL replication token (primary_ssm_path), copied into dc2's own
# store for its agents, which read nothing of dc1.

terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.32"
    }
  }
}

variable "dc1_region" {
  description = "The primary datacenter's region."
  type        = string
  default     = "eu-west-1"
}

variable "dc2_region" {
  description = "The secondary datacenter's region."
  type        = string
  default     = "us-east-1"
}

variable "dc1_ami_id" {
  description = "AMI with Consul and auto-consul installed, in dc1_region."
  type        = string
}

variable "dc2_ami_id" {
  description = "AMI with Consul and auto-consul installed, in dc2_region (AMIs are regional: copy it)."
  type        = string
}

variable "dc1_vpc_id" {
  description = "dc1's VPC, routed to dc2's (peering or transit gateway)."
  type        = string
}

variable "dc2_vpc_id" {
  description = "dc2's VPC, routed to dc1's."
  type        = string
}

variable "dc1_subnet_ids" {
  description = "dc1's subnets, in dc1_vpc_id."
  type        = list(string)
}

variable "dc2_subnet_ids" {
  description = "dc2's subnets, in dc2_vpc_id."
  type        = list(string)
}

provider "aws" {
  alias  = "dc1"
  region = var.dc1_region
}

provider "aws" {
  alias  = "dc2"
  region = var.dc2_region
}

data "aws_vpc" "dc1" {
  provider = aws.dc1
  id       = var.dc1_vpc_id
}

data "aws_vpc" "dc2" {
  provider = aws.dc2
  id       = var.dc2_vpc_id
}

locals {
  dc1_ssm_path = "/auto-consul/dc1"
  dc2_ssm_path = "/auto-consul/dc2"
}

module "dc1" {
  source    = "../../modules/auto-consul"
  providers = { aws = aws.dc1 }

  name            = "consul-dc1"
  vpc_id          = var.dc1_vpc_id
  subnet_ids      = var.dc1_subnet_ids
  ami_id          = var.dc1_ami_id
  registry_prefix = "consul/dc1"
  datacenter      = "dc1"
  servers         = 3

  secrets  = true
  ssm_path = local.dc1_ssm_path

  # Consul's WAN from dc2's servers, on dc1's servers only (security groups
  # cannot name each other across regions: the other VPC's CIDR it is).
  wan_cidr_blocks = [data.aws_vpc.dc2.cidr_block]
}

module "dc2" {
  source    = "../../modules/auto-consul"
  providers = { aws = aws.dc2 }

  name            = "consul-dc2"
  vpc_id          = var.dc2_vpc_id
  subnet_ids      = var.dc2_subnet_ids
  ami_id          = var.dc2_ami_id
  registry_prefix = "consul/dc2"
  datacenter      = "dc2"
  servers         = 3

  secrets  = true
  ssm_path = local.dc2_ssm_path

  wan_cidr_blocks = [data.aws_vpc.dc1.cidr_block]

  # The one setting that makes dc2 a secondary of dc1, and where dc1 keeps
  # the secrets the two share.
  primary_registry = module.dc1.registry_url
  primary_ssm_path = local.dc1_ssm_path
}

output "dc1_registry_url" {
  description = "auto-consul members --registry <this>"
  value       = module.dc1.registry_url
}

output "dc2_registry_url" {
  value = module.dc2.registry_url
}
