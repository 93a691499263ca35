output "bucket_name" {
  description = "Name of the S3 bucket holding the registry."
  value       = local.bucket_name
}

output "registry_url" {
  description = "Registry URL (AUTO_CONSUL_REGISTRY), for example s3://bucket/consul. Pass it to `auto-consul members` or `auto-consul purge` from an operator's machine."
  value       = local.registry_url
}

output "iam_role_name" {
  description = "Name of the instance role carrying the auto-consul policy."
  value       = aws_iam_role.this.name
}

output "iam_role_arn" {
  description = "ARN of the instance role."
  value       = aws_iam_role.this.arn
}

output "instance_profile_name" {
  description = "Name of the instance profile, for instances launched outside this module's autoscaling groups."
  value       = aws_iam_instance_profile.this.name
}

output "security_group_id" {
  description = "ID of the Consul security group. Add other instances to it to let them join the cluster."
  value       = aws_security_group.consul.id
}

output "server_launch_template_id" {
  description = "ID of the servers launch template."
  value       = aws_launch_template.this["servers"].id
}

output "agent_launch_template_id" {
  description = "ID of the agents launch template."
  value       = aws_launch_template.this["agents"].id
}

output "servers_asg_name" {
  description = "Name of the servers autoscaling group."
  value       = aws_autoscaling_group.servers.name
}

output "agents_asg_name" {
  description = "Name of the agents autoscaling group."
  value       = aws_autoscaling_group.agents.name
}

output "user_data" {
  description = "The rendered cloud-config user data of each launch template, by group (servers, agents; not base64 encoded)."
  value       = local.user_data
}
