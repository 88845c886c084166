# shellcheck shell=bash
# The cluster's certificates and service-account key, made with openssl, and
# the kubeconfig of each client. Sourced by up.sh after lib.sh.

new_key() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

# issue NAME SUBJECT EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]: a leaf certificate
# signed by the cluster CA, valid ten years.
issue() {
  local name=$1 subject=$2 eku=$3 sans=${4:-}
  new_key "$PKI/$name.key"
  openssl req -new -key "$PKI/$name.key" -subj "$subject" -out "$PKI/$name.csr"
  {
    echo "basicConstraints = critical, CA:FALSE"
    echo "keyUsage = critical, digitalSignature, keyEncipherment"
    echo "extendedKeyUsage = $eku"
    [[ -n $sans ]] && echo "subjectAltName = $sans"
  } >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 3650 -extfile "$PKI/$name.ext" \
    -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

# write_kubeconfig FILE CERT_NAME: a kubeconfig for the client whose
# certificate is $PKI/CERT_NAME.crt, everything embedded.
write_kubeconfig() {
  local file=$1 name=$2
  cat >"$file" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: stead
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 "$PKI/$name.crt")
    client-key-data: $(base64 -w0 "$PKI/$name.key")
contexts:
- name: stead
  context:
    cluster: stead
    user: $name
current-context: stead
KUBECONFIG
  chmod 600 "$file"
}

make_pki() {
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  new_key "$PKI/ca.key"
  openssl req -x509 -new -key "$PKI/ca.key" -subj "/CN=stead-cluster-ca" -days 3650 \
    -out "$PKI/ca.crt"

  issue kube-apiserver "/CN=kube-apiserver" serverAuth \
    "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:$HOST_IP,IP:$KUBERNETES_SVC_IP"
  issue apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
  issue admin "/O=system:masters/CN=stead-admin" clientAuth
  issue kube-controller-manager "/CN=system:kube-controller-manager" clientAuth
  issue kube-scheduler "/CN=system:kube-scheduler" clientAuth
  issue kube-proxy "/CN=system:kube-proxy" clientAuth
  # Not a system: user: its rights are snapshot-controller-rbac.yaml's.
  issue snapshot-controller "/CN=snapshot-controller" clientAuth

  # Service-account token signing key (ES256) and its public half.
  new_key "$PKI/sa.key"
  openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null

  local c
  for c in kube-controller-manager kube-scheduler kube-proxy snapshot-controller; do
    write_kubeconfig "$STATE/$c.kubeconfig" "$c"
  done
  write_kubeconfig "$KUBECONFIG_ADMIN" admin
}

# make_node_pki I: node I's kubelet serving certificate (its name and address)
# and its client identity system:node:<name> (group system:nodes, which the
# Node authorizer and NodeRestriction expect), with its kubeconfig in the
# node's folder.
make_node_pki() {
  local i=$1 name ip
  name=$(node_name "$i")
  ip=$(node_ip "$i")
  issue "$name-serving" "/CN=$name" serverAuth "DNS:$name,IP:$ip,IP:127.0.0.1"
  issue "$name-kubelet" "/O=system:nodes/CN=system:node:$name" clientAuth
  write_kubeconfig "$(node_dir "$i")/kubelet.kubeconfig" "$name-kubelet"
}
