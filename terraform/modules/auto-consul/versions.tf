terraform {
  # Optional object attributes with defaults and cross-variable validations
  # are not used, so 1.3 is enough; 1.5 is the oldest release still tested.
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # instance_refresh.preferences.max_healthy_percentage of the servers
      # group needs 5.32 (aws_vpc_security_group_ingress_rule and the S3
      # bucket sub-resources need 5.0).
      version = ">= 5.32"
    }
  }
}
