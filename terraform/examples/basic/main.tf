# A three-server Consul cluster plus two agents, in the default VPC.
#
#   terraform init
#   terraform apply -var ami_id=ami-0123456789abcdef0
#
# The AMI must carry Consul (HashiCorp's package) and auto-consul; build one
# with packer/auto-consul.pkr.hcl and set baked_image = true, or use any image
# with both binaries on PATH and keep baked_image = false.

terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.32"
    }
  }
}

variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "eu-west-1"
}

variable "ami_id" {
  description = "AMI with Consul and auto-consul installed."
  type        = string
}

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      Project = "auto-consul-example"
    }
  }
}

data "aws_vpc" "default" {
  default = true
}

data "aws_subnets" "default" {
  filter {
    name   = "vpc-id"
    values = [data.aws_vpc.default.id]
  }
}

module "consul" {
  source = "../../modules/auto-consul"

  name            = "consul-example"
  vpc_id          = data.aws_vpc.default.id
  subnet_ids      = data.aws_subnets.default.ids
  ami_id          = var.ami_id
  baked_image     = false
  registry_prefix = "consul/example"

  servers    = 3
  expiry     = 120
  datacenter = "dc1"

  server_instance_type    = "t3.small"
  agent_instance_type     = "t3.micro"
  agents_desired_capacity = 2

  # Secure at genesis: the first servers make the gossip key, the CA and the
  # ACL tokens in SSM Parameter Store under this path (SecureString,
  # create-only); agents may read only <path>/<cluster id>/agent/*.
  secrets  = true
  ssm_path = "/auto-consul/example"

  # Let the rest of the VPC use Consul's HTTP API and DNS.
  client_cidr_blocks = [data.aws_vpc.default.cidr_block]

  # An example can be thrown away with its heartbeats still in the bucket.
  force_destroy = true

  tags = {
    Environment = "example"
  }
}

output "registry_url" {
  description = "Use with: auto-consul members --registry <this>"
  value       = module.consul.registry_url
}

output "bucket_name" {
  value = module.consul.bucket_name
}

output "security_group_id" {
  value = module.consul.security_group_id
}

output "servers_asg_name" {
  value = module.consul.servers_asg_name
}

output "agents_asg_name" {
  value = module.consul.agents_asg_name
}

output "iam_role_name" {
  description = "The instance roles, by role (server, agent)."
  value       = module.consul.iam_role_name
}

output "instance_profile_name" {
  description = "The instance profiles, by role (server, agent)."
  value       = module.consul.instance_profile_name
}

output "secrets_url" {
  description = "Where the cluster's secrets live (names only, never values)."
  value       = module.consul.secrets_url
}
