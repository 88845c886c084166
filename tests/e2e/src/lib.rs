//! Shared helpers of Stead's cluster suites (client from KUBECONFIG, waiting
//! for conditions, exec into pods).
