terraform {
  # Optional object attributes with defaults and cross-variable validations
  # are not used, so 1.3 is enough; 1.5 is the oldest release still tested.
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # aws_vpc_security_group_ingress_rule and the S3 bucket sub-resources
      # (encryption, versioning, lifecycle) as separate resources need 5.x.
      version = ">= 5.0"
    }
  }
}
