# Packer template: an AMI with Consul and auto-consul baked in.
#
#   packer init packer/auto-consul.pkr.hcl
#   packer build \
#     -var base_ami=ami-0123456789abcdef0 \
#     -var auto_consul_deb=target/debian/auto-consul_0.1.0-1_amd64.deb \
#     packer/auto-consul.pkr.hcl
#
# The bake step is `auto-consul install`: it writes and enables
# /etc/systemd/system/auto-consul.service (a oneshot running `auto-consul run`
# with /etc/auto-consul/auto-consul.env at every boot) and starts nothing.
# The registry URL is left out on purpose: user data supplies it at boot
# (cloud-init/baked-image.yaml, or the Terraform module with
# baked_image = true), so one image serves every cluster.
#
# The base AMI must be Debian or Ubuntu (apt, systemd, cloud-init).

packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.0"
    }
  }
}

variable "region" {
  description = "AWS region to build the AMI in."
  type        = string
  default     = "eu-west-1"
}

variable "base_ami" {
  description = "Debian or Ubuntu AMI to start from."
  type        = string
}

variable "ssh_username" {
  description = "Login user of the base AMI: admin for Debian, ubuntu for Ubuntu."
  type        = string
  default     = "admin"
}

variable "instance_type" {
  description = "Instance type used while building."
  type        = string
  default     = "t3.small"
}

variable "consul_version" {
  description = "Consul version from HashiCorp's apt repository, for example 1.20.1 (installed as package version 1.20.1-1). Empty: the newest."
  type        = string
  default     = ""
}

variable "auto_consul_deb" {
  description = "Path, on the machine running Packer, of the auto-consul .deb to install."
  type        = string
}

variable "servers" {
  description = "Default AUTO_CONSUL_SERVERS baked into the env file (user data may override it)."
  type        = number
  default     = 3
}

variable "expiry" {
  description = "Default AUTO_CONSUL_EXPIRY in seconds baked into the env file (user data may override it)."
  type        = number
  default     = 120
}

locals {
  build_time = formatdate("YYYYMMDDhhmmss", timestamp())
}

source "amazon-ebs" "auto_consul" {
  region        = var.region
  source_ami    = var.base_ami
  instance_type = var.instance_type
  ssh_username  = var.ssh_username
  ami_name      = "auto-consul-${local.build_time}"

  # Build with IMDSv2 required as well, like the instances the AMI is for.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  # Instances launched from the AMI default to IMDSv2 only.
  imds_support = "v2.0"

  tags = {
    Name           = "auto-consul-${local.build_time}"
    consul_version = var.consul_version
    built_by       = "packer"
  }
}

build {
  sources = ["source.amazon-ebs.auto_consul"]

  # Consul from HashiCorp's apt repository: /usr/bin/consul, the consul user
  # and consul.service.
  provisioner "shell" {
    environment_vars = [
      "CONSUL_VERSION=${var.consul_version}",
      "DEBIAN_FRONTEND=noninteractive",
    ]
    inline = [
      "set -eu",
      "cloud-init status --wait || true",
      "sudo -E apt-get update",
      "sudo -E apt-get install -y ca-certificates curl gpg lsb-release",
      "curl -fsSL https://apt.releases.hashicorp.com/gpg | sudo gpg --dearmor --yes -o /usr/share/keyrings/hashicorp-archive-keyring.gpg",
      "echo \"deb [signed-by=/usr/share/keyrings/hashicorp-archive-keyring.gpg] https://apt.releases.hashicorp.com $(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/hashicorp.list",
      "sudo -E apt-get update",
      "if [ -n \"$CONSUL_VERSION\" ]; then sudo -E apt-get install -y \"consul=$CONSUL_VERSION-1\"; else sudo -E apt-get install -y consul; fi",
      "consul version",
    ]
  }

  provisioner "file" {
    source      = var.auto_consul_deb
    destination = "/tmp/auto-consul.deb"
  }

  # auto-consul itself, then the bake step.
  provisioner "shell" {
    environment_vars = [
      "DEBIAN_FRONTEND=noninteractive",
    ]
    inline = [
      "set -eu",
      "sudo -E apt-get install -y /tmp/auto-consul.deb",
      "rm -f /tmp/auto-consul.deb",
      "sudo auto-consul install --servers ${var.servers} --expiry ${var.expiry}",
      "systemctl is-enabled auto-consul.service",
    ]
  }

  # Leave nothing that would make the first boot look like a second one:
  # Consul must not have run (no node id, no Raft state in its data dir),
  # and auto-consul must not have decided a mode.
  provisioner "shell" {
    inline = [
      "set -eu",
      "sudo systemctl disable --now consul.service || true",
      "sudo sh -c 'rm -rf /opt/consul/* /var/lib/auto-consul'",
      "sudo cloud-init clean --logs",
    ]
  }
}
