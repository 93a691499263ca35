output "bucket_name" {
  description = "Name of the S3 bucket holding the registry."
  value       = local.bucket_name
}

output "registry_url" {
  description = "Registry URL (AUTO_CONSUL_REGISTRY), for example s3://bucket/consul. Pass it to `auto-consul members` or `auto-consul purge` from an operator's machine."
  value       = local.registry_url
}

output "iam_role_name" {
  description = "Names of the instance roles, by role: server (the servers group) and agent (the agents group)."
  value       = { for role, r in aws_iam_role.this : role => r.name }
}

output "iam_role_arn" {
  description = "ARNs of the instance roles, by role (server, agent)."
  value       = { for role, r in aws_iam_role.this : role => r.arn }
}

output "instance_profile_name" {
  description = "Names of the instance profiles, by role (server, agent), for instances launched outside this module's autoscaling groups: give a server the server profile and AUTO_CONSUL_ROLE=server, an agent the agent profile and AUTO_CONSUL_ROLE=agent."
  value       = { for role, p in aws_iam_instance_profile.this : role => p.name }
}

output "instance_profile_arn" {
  description = "ARNs of the instance profiles, by role (server, agent)."
  value       = { for role, p in aws_iam_instance_profile.this : role => p.arn }
}

output "iam_policies" {
  description = "The inline IAM policy of each role, by role (server, agent), as JSON: rendered from policies/<role>.json.tftpl."
  value       = local.policies
}

output "registry_bucket_policy" {
  description = "The bucket policy that refuses PutObject without If-None-Match or If-Match on slots/, cluster and cas-probe, as JSON. Applied by the module only to a bucket it creates; with create_bucket = false, merge it into your bucket's policy."
  value       = local.bucket_policy
}

output "ssm_path" {
  description = "SSM Parameter Store path of the cluster's secrets (parameter names only; no value is ever read by Terraform)."
  value       = local.ssm_path
}

output "secrets_url" {
  description = "AUTO_CONSUL_SECRETS of the instances (ssm://<ssm_path>), empty when secrets = false: the --secrets of auto-consul commands run from an operator's machine (whose IAM identity then needs ssm:GetParameter on it)."
  value       = local.secrets_url
}

output "security_group_id" {
  description = "ID of the Consul security group. Add other instances to it to let them join the cluster."
  value       = aws_security_group.consul.id
}

output "server_security_group_id" {
  description = "ID of the servers' own security group (servers only, beside security_group_id): where wan_cidr_blocks opens Consul's WAN, and where to add rules only servers should have."
  value       = aws_security_group.servers.id
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
